"""GPU check: the three stages under torchrun, and the speed, memory and FLOPs of every fidelity.

    python tests/bench/gpu_check.py --json gpu_check.json     # one CUDA GPU (H100 / H200), under 5 minutes
    python tests/bench/gpu_check.py --tiny                    # CPU, tiny sizes, seconds (tests/test_bench.py)

Paper geometry (L = 100 snippets of 8 frames at 224^2, TSM-R18 + G-TAD, batch of 2 videos); --tiny
runs everything at 12 snippets x 2 frames x 32^2, one video a batch. What each figure means:

  stages      a) `torchrun --standalone --nproc_per_node=1 lofi.py --stage acp | lofi | head` (NCCL) on
              a small synthetic set, one epoch cut to a few steps (stage 2: the C-LoFi short cycle with
              c_s = 1, so S, T and ST each run a step): exit code and wall time, imports included.
              --tiny runs the same command lines through lofi.main in one plain CPU process instead (3
              torchrun launches cost ~45 s on a 2-core machine): no process group there.
  s/video     b) a training step of stage 2 (encoder + G-TAD forward, backward, SGD step) on random
              frames, per video; fp32 in NCHW, and bf16 autocast with channels_last. bf16/fp32: the
              ratio of the two step times (< 1: bf16 is faster).
  MiB/video   c) lofi.training_memory: the marginal memory of one more video in a step (what
              `lofi.py --stage plan` reports); step peak: max_memory_allocated of the timed steps above
              what was allocated before them, over the batch (CUDA only, else None).
  GFLOP       d) FlopCounterMode over one training step, per video (convolutions and matmuls; G-TAD's
              sparse SGAlign product is not counted), and TFLOP/s = GFLOP per video x videos per second.
              Checks: torchvision's ResNet-18 at 224^2 counts 1.81 GMAC x 2 FLOP/MAC (within 3 %), and at
              12 x 2 x 32^2 T-LoFi / full lies in 0.2-0.3 (r_t = 4, Eq. 3) and S-LoFi < full.
  extract     e) stage 3's feature extraction, videos/s: the encoder alone on frames in memory (fp32,
              bf16), and lofi.extract_features from the synthetic video files (decoding included).

Exit code 1 when a stage fails or a FLOP check does not hold. Figures: tests/bench/README.md, "GPU check".
"""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import data, gtad, lofi, tsm  # noqa: E402,E401

# mem_bf16: lofi.training_memory under bf16 too (--tiny: fp32 only, to stay inside the test's seconds).
SIZES = {"paper": dict(snippets=100, frames=8, stride=8, size=224, videos=8, batch=2, warmup=2, steps=3,
                       mem_snippets=25, mem_bf16=True),
         "tiny": dict(snippets=12, frames=2, stride=2, size=32, videos=4, batch=1, warmup=0, steps=1,
                      mem_snippets=1, mem_bf16=False)}
# The tiny run's stages: lofi.main per command line in one process; a line per stage says how it ended.
DRIVER = """import json, sys, time
import lofi
for argv in json.loads(sys.argv[1]):
    t0, rc = time.time(), 0
    try:
        lofi.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    print("gpu_check " + json.dumps(dict(stage=argv[1], rc=rc, seconds=time.time() - t0)), flush=True)
    if rc:
        break
"""


def flags(g, preset, work):
    """The data and geometry flags every lofi.py command line here shares."""
    return ["--preset", preset, "--anno", str(work / "synth/anno.json"), "--videos", str(work / "synth/videos"),
            *(f"--{k}={g[k]}" for k in ("snippets", "frames", "stride", "size")), "--epochs", "1",
            f"--batch-size={g['batch']}", f"--workers={0 if preset == 'tiny' else 4}"]


def stage_argvs(g, preset, work):
    """a) lofi.py's command lines of stages 1-3, laid out as train.sh lays them (each --init defaults to
    the previous stage's last.pt)."""
    common = flags(g, preset, work)
    return [["--stage", "acp", *common, "--max-steps", "1", "--out", str(work / "runs/acp")],
            ["--stage", "lofi", *common, "--cycle", "short", "--c-s", "1", "--max-steps", "3", "--out", str(work / "runs/lofi")],
            ["--stage", "head", *common, "--max-steps", "1", "--out", str(work / "runs/lofi_head")]]


def start_stages(argvs, tiny, work):
    """a) -> a function that waits for the stages and returns {stage: dict(rc, seconds[, log])}. On a GPU
    they run one torchrun each, now, before anything is timed; --tiny starts them in the background."""
    if tiny:
        log = open(work / "stages.log", "w+")
        p = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=ROOT, stdout=log, stderr=log,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))     # a core each: the measurements have the other

        def wait():
            rc = p.wait(timeout=120)
            lines = Path(log.name).read_text().splitlines()
            done = [json.loads(x.split(" ", 1)[1]) for x in lines if x.startswith("gpu_check ")]
            out = {r.pop("stage"): r for r in done}
            for argv in argvs:                  # a stage that never reported: the process's own exit code
                out.setdefault(argv[1], dict(rc=rc or 1, seconds=None))
            return {k: dict(r, log=lines[-20:]) if r["rc"] else r for k, r in out.items()}
        return wait
    out = {}
    for argv in argvs:
        t0, log = time.time(), work / f"{argv[1]}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "lofi.py", *argv]
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=150).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        out[argv[1]] = dict(rc=rc, seconds=time.time() - t0)
        if rc:
            out[argv[1]]["log"] = log.read_text().splitlines()[-20:]
            break
    return lambda: out


def model(device, amp):
    """The stage-2 model (Fig. 1) and its optimiser (Sec. 3.3: SGD, lr 0.1, momentum 0, wd 1e-4);
    bf16 runs on channels_last, as stage 2 does on CUDA."""
    encoder = tsm.TSM(tsm.TSMConfig())
    net = tsm.LoFiNet(encoder, gtad.GTAD(gtad.GTADConfig(feat_dim=encoder.dim))).to(device).train()
    if amp:
        encoder.to(memory_format=torch.channels_last)
    return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.0, weight_decay=1e-4)


def training_step(net, opt, fid, frames, batch, device, amp):
    """b) One training step of stage 2 at fidelity fid, as lofi.fit runs it, on random uint8 frames."""
    x = torch.randint(0, 256, (batch, fid.L, frames, 3, fid.H, fid.W), dtype=torch.uint8, device=device)  # (B, L, F, 3, H, W)
    labels = gtad.batch_targets([torch.tensor([[0.2, 0.5], [0.6, 0.9]])] * batch, fid.L, device)  # (B, L) (B, L) (B, L, L)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = gtad.loss(net(x), *labels)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def seconds(fn, warmup, steps, device):
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


def flops(fn):
    """d) FLOPs of one call of fn, as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flop_checks(g, rows, nets, device):
    """d) The counter against a known figure, and the fidelities' FLOPs against Eq. 2-3 at the tiny
    geometry (this run's rows when it runs at that geometry)."""
    with torch.device("meta"):                   # shapes only: no memory, no arithmetic
        resnet, x = torchvision.models.resnet18(), torch.empty(1, 3, 224, 224)
    gmac = flops(lambda: resnet(x)) / 2e9
    full = data.Fidelity(12, 32, 32)
    f = {k: r["gflop_per_video"] for k, r in rows.items()} if g is SIZES["tiny"] else \
        {k: flops(training_step(*nets[False], fid, 2, 1, device, False)) for k, fid in
         (("full", full), ("S", data.s_lofi(full)), ("T", data.t_lofi(full)))}
    out = dict(resnet18_gmac=gmac, t_over_full=f["T"] / f["full"], s_over_full=f["S"] / f["full"])
    out["ok"] = abs(gmac / 1.81 - 1) <= 0.03 and 0.2 <= out["t_over_full"] <= 0.3 and out["s_over_full"] < 1
    return out


def fidelities(g, nets, device):
    """b-d) Per fidelity: step time, memory and FLOPs per video, fp32 and bf16."""
    full = data.Fidelity(g["snippets"], g["size"], g["size"])
    mem_args = argparse.Namespace(depth=18, frames=g["frames"])
    rows = {}
    for name, fid in (("full", full), ("S", data.s_lofi(full)), ("T", data.t_lofi(full)), ("ST", data.st_lofi(full))):
        row = dict(fidelity=str(fid))
        for prec, amp in (("fp32", False), ("bf16", True)):
            step = training_step(*nets[amp], fid, g["frames"], g["batch"], device, amp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t = seconds(step, g["warmup"], g["steps"], device) / g["batch"]
            peak = (torch.cuda.max_memory_allocated(device) - base) / g["batch"] / 2**20 if device.type == "cuda" else None
            mib = lofi.training_memory(mem_args, fid, device, False, amp, min(fid.L, g["mem_snippets"]))[0] / 2**20 \
                if g["mem_bf16"] or not amp else None
            row[prec] = dict(s_per_video=t, mib_per_video=mib, step_peak_mib_per_video=peak)
            if not amp:
                row["gflop_per_video"] = flops(step) / g["batch"] / 1e9
            row[prec]["tflops"] = row["gflop_per_video"] / t / 1e3
        row["bf16_over_fp32"] = row["bf16"]["s_per_video"] / row["fp32"]["s_per_video"]
        rows[name] = row
    return rows


@torch.no_grad()
def extraction(g, preset, nets, device, work):
    """e) Stage 3's feature extraction at full fidelity, videos/s."""
    x = torch.randint(0, 256, (g["batch"], g["snippets"], g["frames"], 3, g["size"], g["size"]), dtype=torch.uint8,
                      device=device)                                                      # (B, L, F, 3, H, W)
    out = {}
    for prec, amp in (("fp32", False), ("bf16", True)):
        encoder = nets[amp][0].encoder.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out[f"{prec}_videos_per_s"] = g["batch"] / seconds(lambda: tsm.encode(encoder, x), g["warmup"], g["steps"], device)
        encoder.train()
    args, inputs = lofi.get_args(["--stage", "head", "--init", "none", *flags(g, preset, work), "--out", str(work / "x")])
    split = lofi.Split(args, inputs, "training")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        lofi.extract_features(args, inputs, nets[False][0].encoder.eval(), split, 0, 1, device)
    out["files_videos_per_s"] = len(split.videos) / (time.perf_counter() - t0)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, tiny sizes: the test suite's run of this script")
    p.add_argument("--json", help="also write the report to this file")
    a = p.parse_args()
    t_start, preset = time.time(), "tiny" if a.tiny else "paper"
    device = torch.device("cpu" if a.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here (--tiny runs on the CPU)")
    g = SIZES[preset]
    if a.tiny:
        torch.set_num_threads(1)         # 2 processes x 2 spinning OpenMP threads on 2 cores run 10x slower
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data.synth(work / "synth", g["videos"], seed=0)        # = python data.py synth DIR --videos N
        wait = start_stages(stage_argvs(g, preset, work), a.tiny, work)
        torch.manual_seed(0)
        nets = {amp: model(device, amp) for amp in (False, True)}
        report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      torch=torch.__version__, preset=preset, batch=g["batch"],
                      fidelities=fidelities(g, nets, device))
        report.update(flop_checks=flop_checks(g, report["fidelities"], nets, device),
                      extract=extraction(g, preset, nets, device, work), stages=wait())
    report["seconds"] = time.time() - t_start
    print(f"{report['device']}, torch {report['torch']}, {preset} geometry, {g['batch']} video(s) a step")
    print(" | ".join(f"stage {k}: rc {r['rc']}, {r['seconds'] or 0:.1f} s" for k, r in report["stages"].items()))
    print("| config | L x H x W | s/video fp32 | bf16/fp32 | MiB/video fp32 / bf16 | step peak MiB/video | GFLOP/video "
          "| TFLOP/s fp32 / bf16 |\n" + "|---" * 8 + "|")
    for k, r in report["fidelities"].items():
        both = lambda key: " / ".join("-" if r[p][key] is None else f"{r[p][key]:.0f}" for p in ("fp32", "bf16"))
        print(f"| {k} | {r['fidelity']} | {r['fp32']['s_per_video']:.3f} | {r['bf16_over_fp32']:.2f} | "
              f"{both('mib_per_video')} | {both('step_peak_mib_per_video')} | {r['gflop_per_video']:.1f} | "
              f"{r['fp32']['tflops']:.2f} / {r['bf16']['tflops']:.2f} |")
    c, e = report["flop_checks"], report["extract"]
    print(f"FLOP checks {'hold' if c['ok'] else 'FAIL'}: ResNet-18 224^2 {c['resnet18_gmac']:.3f} GMAC (1.81); at 12x2x32^2 "
          f"T/full {c['t_over_full']:.3f} (0.2-0.3), S/full {c['s_over_full']:.3f} (< 1)")
    print(f"extraction videos/s: encoder fp32 {e['fp32_videos_per_s']:.2f}, bf16 {e['bf16_videos_per_s']:.2f}; "
          f"from the video files {e['files_videos_per_s']:.2f} | {report['seconds']:.0f} s in all")
    for k, r in report["stages"].items():
        if r["rc"]:
            print(f"stage {k} failed, its last lines:\n" + "\n".join(r["log"]))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0 if c["ok"] and all(r["rc"] == 0 for r in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
