"""GPU check: the three stages under torchrun, and the speed, memory and FLOPs of every fidelity.

    python tests/bench/gpu_check.py --json gpu_check.json     # one CUDA GPU (H100 / H200), under 5 minutes
    python tests/bench/gpu_check.py --tiny                    # CPU, tiny sizes, seconds (tests/test_bench.py)

Paper geometry: L = 100 snippets of 8 frames (stride 8) at 224^2, TSM-R18 + G-TAD, 2 videos a step;
--tiny: 12 snippets x 2 frames x 32^2, 1 video a step, one CPU thread. What each figure means:

  stages      a) `torchrun --standalone --nproc_per_node=1 lofi.py --stage acp | lofi | head` (NCCL) on
              an 8-video synthetic set (`data.py synth`), 1 epoch cut to 1-3 steps (stage 2: C-LoFi short
              cycle, c_s = 1, so S, T and ST each run a step): exit code, wall time (imports included).
              --tiny: the same command lines through lofi.main in this process, in torchrun's environment
              for one rank, so lofi still opens a gloo group and runs DDP (3 torchrun launches alone
              take ~45 s on a 2-core machine).
  s/video     b) a stage-2 training step (LoFiNet: encoder + G-TAD forward, backward, SGD step) on random
              frames, per video; fp32 in NCHW, and bf16 autocast + channels_last. bf16/fp32: the ratio
              of the two step times (< 1: bf16 is faster).
  MiB/video   c) tsm.training_memory: the marginal memory of one more video in a step (as `lofi.py --stage
              plan`); step peak: max_memory_allocated over the timed steps, less what was allocated before
              them, over the batch (CUDA only, else None).
  GFLOP       d) FlopCounterMode over one training step, per video (convolutions and matmuls, forward and
              backward; G-TAD's sparse SGAlign product is not counted); TFLOP/s = GFLOP/video x videos/s.
              Checks: torchvision's ResNet-18 at 224^2 (on the meta device) counts 1.81 GMAC x 2 FLOP/MAC
              within 3 %, and at 12 x 2 x 32^2 T-LoFi / full is in 0.2-0.3 (r_t = 4) and S-LoFi < full.
  extract     e) stage 3's feature extraction, videos/s: the encoder alone on frames in memory (fp32,
              bf16), and lofi.extract_features from the synthetic video files (decoding included).

Exit code 1 if a stage fails or a FLOP check does not hold; --json writes a partial report (with 'error')
if the script crashes. Figures: tests/bench/README.md, "GPU check".
"""
import argparse
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import data, gtad, lofi, tsm  # noqa: E402,E401
import synthetic  # noqa: E402  (beside this file)

STAGE_TIMEOUT = 90                   # seconds a torchrun stage may take; past it the stage fails with rc 124
# mem_bf16: tsm.training_memory under bf16 too (--tiny: fp32 only, to stay inside the test's seconds).
SIZES = {"paper": dict(snippets=100, frames=8, stride=8, size=224, videos=8, batch=2, warmup=2, steps=3,
                       mem_snippets=25, mem_bf16=True),
         "tiny": dict(snippets=12, frames=2, stride=2, size=32, videos=4, batch=1, warmup=0, steps=1,
                      mem_snippets=1, mem_bf16=False)}


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
            ["--stage", "lofi", *common, "--cycle", "short", "--c-s", "1", "--max-steps", "3",
             "--out", str(work / "runs/lofi")],
            ["--stage", "head", *common, "--max-steps", "1", "--out", str(work / "runs/lofi_head")]]


def run_stages(argvs, tiny, work):
    """a) Stage by stage, up to the first failure -> {stage: dict(rc, seconds[, log: its last lines])}: a
    torchrun each, or with --tiny lofi.main in this process."""
    out = {}
    for argv in argvs:
        t0, log = time.time(), work / f"{argv[1]}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "lofi.py", *argv]
        with open(log, "w") as f:
            if tiny:
                rc = in_process(argv, f)
            else:                 # its own session: a timeout kills torchrun's worker too, not torchrun alone
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    rc = proc.wait(timeout=STAGE_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    rc = 124
        out[argv[1]] = dict(rc=rc, seconds=time.time() - t0)
        if rc:
            out[argv[1]]["log"] = log.read_text().splitlines()[-20:]
            break
    return out


def in_process(argv, f):
    """lofi.main(argv) in torchrun's environment for a 1-process job, so that lofi opens (and closes) a gloo
    group and wraps the model in DDP; its output to the file f -> 0, lofi's exit code (2: bad input), or 1."""
    with socket.socket() as s:                                     # a free port for the group's store
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    with mock.patch.dict(os.environ, env), contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            lofi.main(argv)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:
            traceback.print_exc()
            return 1
    return 0


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
    x = torch.randint(0, 256, (batch, fid.L, frames, 3, fid.H, fid.W), dtype=torch.uint8,
                      device=device)                                                      # (B, L, F, 3, H, W)
    segments = [torch.tensor([[0.2, 0.5], [0.6, 0.9]])] * batch
    labels = gtad.batch_targets(segments, fid.L, device)                         # (B, L) (B, L) (B, L, L)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = gtad.loss(net(x), *labels)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def seconds(fn, warmup, steps, device):
    """Seconds a call of fn, the mean of `steps` after `warmup` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


def flops(fn):
    """d) FLOPs of one call of fn, as FlopCounterMode counts them. A training step runs on its real device:
    gtad.knn's torch.autocast(x.device.type) refuses the meta device."""
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
            peak = None if device.type != "cuda" else \
                (torch.cuda.max_memory_allocated(device) - base) / g["batch"] / 2**20
            mib = tsm.training_memory(18, g["frames"], fid, device, False, amp, g["mem_snippets"])[0] / 2**20 \
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
            t = seconds(lambda: tsm.encode(encoder, x), g["warmup"], g["steps"], device)
        out[f"{prec}_videos_per_s"] = g["batch"] / t
        encoder.train()
    args, inputs = lofi.get_args(["--stage", "head", "--init", "none", *flags(g, preset, work),
                                  "--out", str(work / "extract")])
    split = lofi.videos_of(args, inputs, "training")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        lofi.extract_features(args, inputs, nets[False][0].encoder.eval(), split, 0, 1, device, work / "features")
    out["files_videos_per_s"] = len(split.videos) / (time.perf_counter() - t0)
    return out


def show(report):
    """The report as a few lines and a table."""
    print(f"{report['device']}, torch {report['torch']}, {report['preset']} geometry, {report['batch']} video(s) a step")
    print(f"stages ({report['launch']}): " + " | ".join(f"{k} rc {r['rc']}, {r['seconds']:.1f} s"
                                                        for k, r in report["stages"].items()))
    print("| config | L x H x W | s/video fp32 | bf16/fp32 | MiB/video fp32 / bf16 | step peak MiB/video | GFLOP/video "
          "| TFLOP/s fp32 / bf16 |\n" + "|---" * 8 + "|")
    for k, r in report["fidelities"].items():
        both = lambda key, f: " / ".join("-" if r[p][key] is None else format(r[p][key], f) for p in ("fp32", "bf16"))
        print(f"| {k} | {r['fidelity']} | {r['fp32']['s_per_video']:.3f} | {r['bf16_over_fp32']:.2f} | "
              f"{both('mib_per_video', '.0f')} | {both('step_peak_mib_per_video', '.0f')} | "
              f"{r['gflop_per_video']:.1f} | {both('tflops', '.3g')} |")
    c, e = report["flop_checks"], report["extract"]
    print(f"FLOP checks {'hold' if c['ok'] else 'FAIL'}: ResNet-18 224^2 {c['resnet18_gmac']:.3f} GMAC (1.81); "
          f"at 12x2x32^2 T/full {c['t_over_full']:.3f} (0.2-0.3), S/full {c['s_over_full']:.3f} (< 1)")
    print(f"extraction videos/s: encoder fp32 {e['fp32_videos_per_s']:.2f}, bf16 {e['bf16_videos_per_s']:.2f}; "
          f"from the video files {e['files_videos_per_s']:.2f} | {report['seconds']:.0f} s in all")
    for k, r in report["stages"].items():
        if r["rc"]:
            print(f"stage {k} failed, its last lines:\n" + "\n".join(r["log"]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, tiny sizes: the test suite's run of this script")
    p.add_argument("--json", help="also write the report to this file (a partial one, with 'error', on a crash)")
    a = p.parse_args()
    t_start, preset = time.time(), "tiny" if a.tiny else "paper"
    device, g = torch.device("cpu" if a.tiny else "cuda"), SIZES[preset]
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here (--tiny runs on the CPU)")
    if a.tiny:                # one thread: OpenMP's spinning threads on a shared 2-core machine run many times slower
        torch.set_num_threads(1)
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, preset=preset, batch=g["batch"],
                  launch="lofi.main in-process, gloo" if a.tiny else "torchrun --standalone --nproc_per_node=1, nccl")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            synthetic.synth(work / "synth", g["videos"], seed=0)        # = python data.py synth DIR --videos N
            report["stages"] = run_stages(stage_argvs(g, preset, work), a.tiny, work)   # first: the device is idle
            torch.manual_seed(0)
            nets = {amp: model(device, amp) for amp in (False, True)}
            report["fidelities"] = fidelities(g, nets, device)
            report["flop_checks"] = flop_checks(g, report["fidelities"], nets, device)
            report["extract"] = extraction(g, preset, nets, device, work)
    except BaseException:
        report["error"] = traceback.format_exc()
        raise
    finally:
        report["seconds"] = time.time() - t_start
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
    show(report)
    return 0 if report["flop_checks"]["ok"] and all(r["rc"] == 0 for r in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
