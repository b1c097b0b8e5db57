"""lofi.py: the three stages end to end on synthetic videos, DDP parity, exact resume, bad data."""
import json
import math
import multiprocessing
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import data
import gtad
import lofi
import tsm
from bench import synthetic
from conftest import ROOT

# Small enough for seconds a stage on a CPU: 12 snippets x 2 frames x 32^2 at full fidelity.
SMALL = ["--preset", "tiny", "--snippets", "12", "--frames", "2", "--stride", "2", "--size", "32",
         "--batch-size", "2", "--workers", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synthetic.synth(root, videos=8, seed=1)
    return ["--anno", str(root / "anno.json"), "--videos", str(root / "videos")]


def refused(argv, capsys):
    """lofi.main(argv) must stop on bad input with exit code 2 and one line on stderr -> that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        lofi.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("lofi.py: error: "), (stop.value.code, err)
    return err[0]


def params(path, key):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def as_rank(script_and_args, env, log):
    """In a forked child: the script as `python script args...` runs it, in a rank's environment, stdout and
    stderr to `log`; torch and OpenCV on one thread, so no thread pool of the parent's is used across the fork."""
    os.environ.update(env)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for std in (1, 2):
        os.dup2(fd, std)
    sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
    sys.argv = [str(a) for a in script_and_args]
    runpy.run_path(sys.argv[0], run_name="__main__")


def start_ranks(script_and_args, logs, n=2):
    """n processes of a script as torchrun starts its ranks (RANK, WORLD_SIZE, MASTER_ADDR/PORT), forked from
    this one, whose torch is imported already (a fresh interpreter costs seconds a rank); rank r's output
    in <logs>/rank<r>.log -> the processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    Path(logs).mkdir(parents=True, exist_ok=True)
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n))
    procs = [multiprocessing.get_context("fork").Process(target=as_rank, daemon=True, args=(   # (die with pytest)
        script_and_args, dict(env, RANK=str(r), LOCAL_RANK=str(r)), Path(logs) / f"rank{r}.log")) for r in range(n)]
    for p in procs:
        p.start()
    return procs


def start_plain(script_and_args, log, daemon=True):
    """One process of a script, forked as start_ranks forks, with no rank environment: a plain `python` (daemon
    False: one that may start DataLoader workers)."""
    proc = multiprocessing.get_context("fork").Process(target=as_rank, args=(script_and_args, {}, log), daemon=daemon)
    proc.start()
    return proc


def run_ranks(script_and_args, logs, n=2):
    """start_ranks, waited for (2 minutes at most) -> (exit codes, rank outputs)."""
    procs = start_ranks(script_and_args, logs, n)
    for p in procs:
        p.join(120)
        if p.exitcode is None:
            p.kill()
            p.join()
    return [p.exitcode for p in procs], [(Path(logs) / f"rank{r}.log").read_text() for r in range(n)]


def test_three_stages_in_sequence(synth, tmp_path):
    lofi.main(["--stage", "acp", *SMALL, *synth, "--out", str(tmp_path / "acp"), "--epochs", "1"])
    lofi.main(["--stage", "lofi", *SMALL, *synth, "--out", str(tmp_path / "lofi"), "--epochs", "3",
               "--init", str(tmp_path / "acp" / "last.pt")])
    lofi.main(["--stage", "head", *SMALL, *synth, "--out", str(tmp_path / "head"), "--epochs", "2",
               "--init", str(tmp_path / "lofi" / "last.pt")])
    log = [json.loads(line) for line in open(tmp_path / "lofi" / "log.jsonl")]
    # Long C-LoFi: one configuration per epoch, S -> T -> ST, never full fidelity (12x32x32).
    assert [r["fidelity"] for r in log] == [["12x16x16"], ["3x32x32"], ["6x22x22"]]
    assert all(r["total"] > 0 for r in log)
    # The LoFi encoder really changed and stage 3 really used it (frozen, so identical there).
    acp, lofi_enc, head_enc = (params(tmp_path / d / "last.pt", "encoder") for d in ("acp", "lofi", "head"))
    k = "layer4.1.conv2.weight"
    assert not torch.equal(acp[k], lofi_enc[k]) and torch.equal(lofi_enc[k], head_enc[k])
    dets = json.load(open(tmp_path / "head" / "detections.json"))["results"]
    anno = json.load(open(synth[1]))["database"]
    assert set(dets) == {v for v, a in anno.items() if a["subset"] == "validation"}
    for vid, found in dets.items():
        assert 0 < len(found) <= 2 * 100
        for d in found:
            assert 0 <= d["segment"][0] <= d["segment"][1] <= anno[vid]["duration"] + 1e-6
    metrics = json.load(open(tmp_path / "head" / "metrics.json"))
    assert 0.0 <= metrics["average-mAP"] <= 1.0 and len(metrics) == 11
    # Its video-level scores, for another encoder's head (--video-scores): the classes its detections carry.
    scores, names = gtad.read_video_scores(tmp_path / "head" / "video_scores.json")
    assert set(scores) == set(dets) and names == data.class_names(data.read_annotations(synth[1])[0])
    for vid, found in dets.items():
        assert {d["label"] for d in found} <= {names[c] for c in np.argsort(-scores[vid], kind="stable")[:2]}
    # Features: one (L, D) file a video, reused when encoder and geometry match, made again when not.
    files = sorted((tmp_path / "head" / "features").glob("*.npy"))
    assert len(files) == 8 and np.load(files[0]).shape == (12, 512)
    mtimes = [os.path.getmtime(f) for f in files]
    lofi.main(["--stage", "head", *SMALL, *synth, "--out", str(tmp_path / "head"), "--epochs", "1",
               "--init", str(tmp_path / "lofi" / "last.pt"), "--overwrite"])
    assert [os.path.getmtime(f) for f in files] == mtimes
    lofi.main(["--stage", "head", *SMALL, *synth, "--out", str(tmp_path / "head"), "--epochs", "1",
               "--init", str(tmp_path / "acp" / "last.pt"), "--overwrite"])
    assert all(os.path.getmtime(f) != m for f, m in zip(files, mtimes))
    # Stage detect on one validation video: JSON with detections, a timeline PNG of the drawn size.
    vid = sorted(dets)[0]
    video = data.video_files(synth[3])[vid]
    found = lofi.main(["--stage", "detect", "--run", str(tmp_path / "head"), "--video", str(video),
                       "--anno", synth[1]])
    assert found and json.load(open(tmp_path / "head" / f"detect_{video.stem}.json"))["detections"] == found
    png = cv2.imread(str(tmp_path / "head" / f"detect_{video.stem}.png"))
    rows = len(anno[vid]["annotations"]) + min(10, len(found))
    assert png.shape == (26 * (rows + 1) + 10, 1000, 3)


def test_resume_equals_uninterrupted(synth, tmp_path):
    common = ["--stage", "lofi", *SMALL, *synth, "--max-steps", "2"]
    lofi.main([*common, "--out", str(tmp_path / "straight"), "--epochs", "2"])
    lofi.main([*common, "--out", str(tmp_path / "resumed"), "--epochs", "1"])
    lofi.main([*common, "--out", str(tmp_path / "resumed"), "--epochs", "2", "--resume"])
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 2
    for part in ("encoder", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_two_process_gloo_matches_accumulated_single_process(synth, tmp_path):
    """DDP's averaged gradient = the mean of the two per-rank batches' gradients, same RNG draws.

    The G-TAD loss is not a sum over videos, so the reference is not one big batch but two
    per-rank batches, each with its rank's generator, gradients accumulated and halved."""
    argv = ["--stage", "lofi", *SMALL, *synth, "--batch-size", "4", "--max-steps", "1", "--epochs", "1",
            "--freeze-bn", "--cycle", "short", "--out", str(tmp_path / "ddp"), "--preset", "paper"]   # SGD, momentum 0
    codes, errs = run_ranks([ROOT / "lofi.py", *argv], tmp_path / "logs")
    assert codes == [0, 0], errs[0][-3000:]
    args, inputs = lofi.get_args([*argv, "--out", str(tmp_path / "reference")])   # (the run's folder holds a run)
    torch.manual_seed(args.seed)                      # rank 0's initial weights, which DDP broadcasts
    net = tsm.LoFiNet(enc := lofi.build_encoder(args, inputs), gtad.GTAD(gtad.GTADConfig(feat_dim=enc.dim)))
    net.train()
    lofi.tsm.set_bn_eval(net)
    ds = lofi.tal_dataset(args, inputs, lofi.videos_of(args, inputs, "training").videos)
    _, configs = lofi.fidelity_grid(args)
    for rank in (0, 1):
        sampler = data.Batches(len(ds), 2, rank, 2, args.seed, configs=configs, cycle="short")
        sampler.set_epoch(0)
        batch = data.collate([ds[i] for i in next(iter(sampler))])
        labels = gtad.batch_targets(batch["segments"], batch["fidelity"].L, "cpu")
        losses = gtad.loss(net(batch["frames"]), *labels,
                           generator=gtad.loss_generator(args.seed, 0, 0, rank, "cpu"))
        (losses["total"] / 2).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= args.lr * (p.grad + 1e-4 * p)
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    for part, module in (("encoder", net.encoder), ("head", net.head)):
        for k, v in module.state_dict().items():
            torch.testing.assert_close(ddp[part][k], v, rtol=1e-4, atol=1e-6, msg=f"{part}.{k}")


def test_plan_reports_all_four_configurations(tmp_path):
    rows = lofi.main(["--stage", "plan", "--preset", "tiny", "--snippets", "12", "--frames", "2", "--size", "32",
                      "--budget-gb", "1", "--out", str(tmp_path)])
    assert [r["config"] for r in rows[::4]] == ["full", "S", "T", "ST"]
    assert all(r["mib_per_video"] > 0 and r["fits"] >= 1 for r in rows)
    # Recomputing encoder activations holds less for backward than keeping them.
    plain = next(r for r in rows if r["config"] == "full" and not r["checkpoint"] and not r["amp"])
    ckpt = next(r for r in rows if r["config"] == "full" and r["checkpoint"] and not r["amp"])
    assert ckpt["mib_per_video"] < plain["mib_per_video"]
    # T-LoFi keeps a quarter of the snippets (3 of 12) at full size: a quarter of the encoder's memory.
    mib = {r["config"]: r["mib_per_video"] for r in rows if not r["checkpoint"] and not r["amp"]}
    assert 0.2 < mib["T"] / mib["full"] < 0.35 and mib["S"] < mib["full"]


def test_torchrun_one_process_equals_plain_python(synth, tmp_path):
    argv = ["--stage", "lofi", *SMALL, *synth, "--epochs", "1", "--max-steps", "2"]
    lofi.main([*argv, "--out", str(tmp_path / "plain")])
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          str(ROOT / "lofi.py"), *argv, "--out", str(tmp_path / "torchrun")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("plain", "torchrun"))
    for part in ("encoder", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_truncated_checkpoint_is_refused_by_name(synth, tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save({"stage": "lofi", "encoder": {}}, good)
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(good.read_bytes()[:100])            # a write cut short
    argv = ["--stage", "lofi", *SMALL, *synth, "--epochs", "1"]
    pattern = r"last\.pt: cannot read it as a PyTorch checkpoint"
    assert re.search(pattern, refused([*argv, "--out", str(out), "--resume"], capsys))
    assert re.search(pattern, refused([*argv, "--out", str(tmp_path / "other"), "--init", str(out / "last.pt")], capsys))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert re.search(r"notes\.txt: cannot read it", refused([*argv, "--init", str(tmp_path / "notes.txt")], capsys))


# ---------------- bad flags, dirty data, failures
@pytest.mark.parametrize("extra, pattern", [
    (["--anno", "/nonexistent/anno.json"], r"--anno /nonexistent/anno.json: no such file"),
    (["--anno", "BAD_JSON"], r"anno.json: not valid JSON"),
    (["--batch-size", "0"], r"argument --batch-size: 0: must be a positive integer"),
    (["--cycle", "short", "--c-s", "0"], r"argument --c-s: 0: must be a positive integer"),
    (["--snippets", "0"], r"argument --snippets: 0: must be a positive integer"),
    (["--snippets", "8"], r"--snippets 8: G-TAD needs L >= 3"),
    (["--epochs", "-1"], r"argument --epochs: -1: must be a positive integer"),
    (["--lr", "nan"], r"argument --lr: nan: must be a positive number"),
    (["--workers", "-2"], r"argument --workers: -2: must be a non-negative integer"),
    (["--size", "8"], r"--size 8: must be at least 32"),
    (["--max-bad", "2"], r"argument --max-bad: 2: must be a fraction"),
    (["--momentum", "1"], r"--momentum 1.0: must be in \[0, 1\)"),
    (["--videos", "/nonexistent"], r"--videos /nonexistent: not a folder"),
    (["--store", "/nonexistent"], r"give one of --videos, --store and --features"),
    (["--init", "/nonexistent.pt"], r"--init /nonexistent.pt: no such checkpoint file"),
    (["--cycle", "sometimes"], r"argument --cycle: invalid choice"),
    (["--feat-stride", "16"], r"--feat-stride, --float16: --stage extract"),
])
def test_bad_flags_get_one_line_and_exit_2(synth, tmp_path, capsys, extra, pattern):
    if "BAD_JSON" in extra:
        (tmp_path / "anno.json").write_text('{"database": {"a": ')
        extra = ["--anno", str(tmp_path / "anno.json")]
    line = refused(["--stage", "lofi", *SMALL, *synth, "--out", str(tmp_path / "run"), *extra], capsys)
    assert re.search(pattern, line), line
    assert not (tmp_path / "run").exists()                     # refused before anything was read or written


def test_bad_flag_in_a_real_process_prints_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "lofi.py"), "--stage", "lofi", "--batch-size", "0"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert "argument --batch-size: 0: must be a positive integer" in run.stderr


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """A synthetic set with one training video missing, one cut short (an MJPG .avi that opens, states
    all its frames and ends half-way), one empty file, and one validation video missing."""
    root = tmp_path_factory.mktemp("dirty")
    synthetic.synth(root, videos=16, seed=2)
    anno = json.load(open(root / "anno.json"))["database"]
    train = sorted(v for v, a in anno.items() if a["subset"] == "training")
    val = sorted(v for v, a in anno.items() if a["subset"] == "validation")
    gone, cut, empty, val_gone = train[1], train[4], train[7], val[2]
    for vid in (gone, val_gone):
        (root / "videos" / f"{vid}.mp4").unlink()
    (root / "videos" / f"{empty}.mp4").write_bytes(b"")
    cap = cv2.VideoCapture(str(root / "videos" / f"{cut}.mp4"))
    frames = [f for ok, f in iter(cap.read, (False, None))]
    out = cv2.VideoWriter(str(root / "videos" / f"{cut}.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, frames[0].shape[1::-1])
    for f in frames:
        out.write(f)
    out.release()
    (root / "videos" / f"{cut}.mp4").unlink()
    blob = (root / "videos" / f"{cut}.avi").read_bytes()
    (root / "videos" / f"{cut}.avi").write_bytes(blob[:len(blob) // 2])
    return root, dict(gone=gone, cut=cut, empty=empty, val_gone=val_gone)


def prepare(root, store, *extra, capsys=None):
    """`data.py prepare` at SMALL's geometry -> its last line: in a real process, or with capsys in this one
    (one interpreter fewer to start, torch's import alone is seconds here)."""
    argv = ["prepare", "--anno", str(root / "anno.json"), "--videos", str(root / "videos"), "--store", str(store),
            "--preset", "tiny", "--snippets", "12", "--frames", "2", "--stride", "2", "--size", "32", *extra]
    if capsys is not None:
        capsys.readouterr()
        code = data.main(argv)
        said = capsys.readouterr()
        assert code in (0, None), said.err
        return said.out.strip().splitlines()[-1]
    run = subprocess.run([sys.executable, str(ROOT / "data.py"), *argv], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()[-1]


def test_every_stage_trains_from_the_store_without_the_video_folder(synth, tmp_path, capsys):
    root = tmp_path / "synth"
    shutil.copytree(Path(synth[1]).parent, root)                     # the module's set (videos=8, seed=1), a copy
    prepare(root, tmp_path / "store", "--workers", "1", capsys=capsys)  # the dirty-data test runs 2 workers, a process
    (root / "videos").rename(root / "elsewhere")                     # from here on, no video file exists
    argv = [*SMALL, "--anno", str(root / "anno.json"), "--store", str(tmp_path / "store")]
    lofi.main(["--stage", "acp", *argv, "--out", str(tmp_path / "acp"), "--epochs", "1"])
    lofi.main(["--stage", "lofi", *argv, "--out", str(tmp_path / "lofi"), "--epochs", "3", "--workers", "2",
               "--init", str(tmp_path / "acp" / "last.pt")])
    lofi.main(["--stage", "head", *argv, "--out", str(tmp_path / "head"), "--epochs", "2", "--bn-recal", "2",
               "--init", str(tmp_path / "lofi" / "last.pt")])
    acp = [json.loads(line) for line in open(tmp_path / "acp" / "log.jsonl")]
    assert acp[-1]["stage"] == "acp" and np.isfinite(acp[-1]["loss"])
    log = [json.loads(line) for line in open(tmp_path / "lofi" / "log.jsonl")]
    assert [r["fidelity"] for r in log] == [["12x16x16"], ["3x32x32"], ["6x22x22"]]
    metrics = json.load(open(tmp_path / "head" / "metrics.json"))
    assert 0 <= metrics["average-mAP"] <= 1
    assert json.load(open(tmp_path / "head" / "detections.json"))["results"]
    assert len(list((tmp_path / "head" / "features").glob("*.npy"))) == 8
    assert json.load(open(tmp_path / "head" / "features" / "features.json"))["source"] == "store"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_prepare_records_dirty_videos_and_stages_skip_them_by_name(dirty, tmp_path, capsys):
    root, bad = dirty
    last = prepare(root, tmp_path / "store", "--workers", "2")
    assert re.fullmatch(rf"prepared 12 videos \(2 failed, 2 missing\): \d+ frames, \d+ bytes -> {tmp_path / 'store'}", last)
    records = data.FrameStore(tmp_path / "store").records
    assert records[bad["gone"]]["error"].startswith("missing") and records[bad["val_gone"]]["error"].startswith("missing")
    assert "stream ends at frame" in records[bad["cut"]]["error"] and "cannot open" in records[bad["empty"]]["error"]
    argv = [*SMALL, "--anno", str(root / "anno.json"), "--store", str(tmp_path / "store"), "--max-bad", "0.4"]
    lofi.main(["--stage", "lofi", *argv, "--out", str(tmp_path / "lofi"), "--epochs", "1"])
    said = capsys.readouterr().out
    assert all(bad[k] in said for k in ("gone", "cut", "empty")), said
    listed = (tmp_path / "lofi" / "missing.txt").read_text().splitlines()
    assert sorted(listed) == sorted(f"{bad[k]}\ttraining" for k in ("gone", "cut", "empty"))
    assert "needs {'snippets': 16" in refused([*argv, "--stage", "lofi", "--snippets", "16"], capsys)   # another geometry
    argv[argv.index("--store") + 1] = str(tmp_path / "nowhere")
    assert "nowhere: not a frame store" in refused([*argv, "--stage", "lofi"], capsys)


PREPARE_WAITS = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import data
flag, real_chain = Path(sys.argv[2]), data.chain


def chain(*records):                      # prepare holds the store here, before it writes its first video
    flag.touch()
    while not flag.with_suffix(".go").exists():
        time.sleep(0.005)
    return real_chain(*records)


data.chain = chain
raise SystemExit(data.main(sys.argv[3:]))
"""


def test_one_prepare_at_a_time_on_a_store(synth, tmp_path, capsys):
    """While a `prepare` writes a store, a second one on it is refused within seconds (one line, exit 2) and
    the first completes; the store is then whole, and a rerun has nothing left to decode."""
    argv = ["prepare", *synth, "--store", str(tmp_path / "store"), "--preset", "tiny", "--snippets", "12",
            "--frames", "2", "--stride", "2", "--size", "32", "--workers", "1"]
    (tmp_path / "waits.py").write_text(PREPARE_WAITS)
    first = start_plain([tmp_path / "waits.py", ROOT, tmp_path / "flag", *argv], tmp_path / "first.log")
    deadline = time.time() + 60
    while not (tmp_path / "flag").exists():
        assert time.time() < deadline and first.is_alive(), (tmp_path / "first.log").read_text()[-2000:]
        time.sleep(0.005)
    t0 = time.time()
    capsys.readouterr()
    with pytest.raises(SystemExit) as second:
        data.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert second.value.code == 2 and time.time() - t0 < 30 and len(err) == 1, err
    assert err[0] == (f"data.py: error: --store {tmp_path / 'store'}: another `prepare` is writing it (it holds "
                      f"{tmp_path / 'store' / 'lock'})")
    (tmp_path / "flag.go").touch()
    first.join(60)
    assert first.exitcode == 0, (tmp_path / "first.log").read_text()[-2000:]
    assert "prepared 8 videos (0 failed, 0 missing)" in (tmp_path / "first.log").read_text()
    assert data.main(argv) == 0 and "8 videos already in" in capsys.readouterr().out


def test_missing_cut_and_empty_videos_are_skipped_replaced_and_named(dirty, tmp_path, capsys, monkeypatch):
    root, bad = dirty
    argv = [*SMALL, "--anno", str(root / "anno.json"), "--videos", str(root / "videos")]
    lofi.main(["--stage", "lofi", *argv, "--out", str(tmp_path / "lofi"), "--epochs", "2", "--max-bad", "0.3"])
    said = capsys.readouterr().out
    assert all(vid in said for vid in (bad["gone"], bad["cut"], bad["empty"])), said
    assert (tmp_path / "lofi" / "missing.txt").read_text() == f"{bad['gone']}\ttraining\n"
    log = [json.loads(line) for line in open(tmp_path / "lofi" / "log.jsonl")]
    broken = {r["id"]: r["reason"] for r in log if r.get("event") == "broken"}
    assert set(broken) == {bad["cut"], bad["empty"]}                       # once each, though both epochs met them
    assert "stream ends at frame" in broken[bad["cut"]] and "cannot open" in broken[bad["empty"]]
    epochs = [r for r in log if r.get("stage") == "lofi"]
    assert [r["steps"] for r in epochs] == [5, 5]                            # 11 of 12 have files; batch 2
    # Stage 3: broken training videos get no features; the missing validation video is a miss.
    lofi.main(["--stage", "head", *argv, "--out", str(tmp_path / "head"), "--epochs", "1", "--max-bad", "0.3",
               "--init", str(tmp_path / "lofi" / "last.pt")])
    said = capsys.readouterr().out
    named = [line for line in said.splitlines() if "training video(s) failed to decode while extracting" in line]
    assert len(named) == 1 and named[0].startswith("2 ") and bad["cut"] in named[0] and bad["empty"] in named[0]
    assert {f.stem for f in (tmp_path / "head" / "features").glob("*.npy")} == {
        f"v_{v}" for v in data.read_annotations(root / "anno.json")[0] if v not in bad.values()}
    dets = json.load(open(tmp_path / "head" / "detections.json"))["results"]
    assert len(dets) == 3 and bad["val_gone"] not in dets
    # A rerun skips the broken videos it recorded; one killed before it recorded them tries them again, the
    # last ones replaced by a video done before (no 16 failures in a row, no traceback), nothing encoded again.
    index = json.load(open(tmp_path / "head" / "features" / "features.json"))
    assert sorted(index["broken"]) == sorted([bad["cut"], bad["empty"]])
    assert "stream ends" in index["broken"][bad["cut"]]
    kept, real, calls = open(tmp_path / "head" / "detections.json").read(), tsm.encode, []
    monkeypatch.setattr(tsm, "encode", lambda e, f: calls.append(1) or real(e, f))
    for forget in (True, False):
        if forget:
            (tmp_path / "head" / "features" / "features.json").write_text(json.dumps(dict(index, broken={})))
        lofi.main(["--stage", "head", *argv, "--out", str(tmp_path / "head"), "--epochs", "1", "--max-bad", "0.3",
                   "--init", str(tmp_path / "lofi" / "last.pt"), "--resume"])
        assert f"{2 if forget else 0} to extract" in capsys.readouterr().out.split("validation features")[0]
        assert json.load(open(tmp_path / "head" / "features" / "features.json"))["broken"] == index["broken"]
        assert open(tmp_path / "head" / "detections.json").read() == kept and calls == []
    # Both protocols: the official one (the missing video's instances missed), then the one without it.
    official = json.load(open(tmp_path / "head" / "metrics.json"))["average-mAP"]
    available = lofi.evaluate.detection_map(root / "anno.json", tmp_path / "head" / "detections.json",
                                            blocked={bad["val_gone"]})[1]
    assert official == lofi.evaluate.detection_map(root / "anno.json", tmp_path / "head" / "detections.json")[1]
    assert f"average-mAP {100 * available:.2f} on the 3 of 4 validation videos with features (OpenTAD's protocol; " \
        "the official, above, counts the other 1 as missed)" in said
    # At the default --max-bad (0.1), 3 of 12 training videos stop stage 2, all three named.
    line = refused(["--stage", "lofi", *argv, "--out", str(tmp_path / "strict"), "--epochs", "1"], capsys)
    assert "3 of 12 training videos are missing or broken" in line and all(v in line for v in list(bad.values())[:3])


RANK_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import lofi
dist.init_process_group("gloo")
rank = dist.get_rank()


def batches(phase):
    for step in range(50 if phase != "signal" else 4):     # (no 5th batch: the signal stops both at step 3)
        if rank == 1 and step == 3 and phase == "loading":
            raise RuntimeError("the disk of rank 1 is on fire")
        yield step, torch.randn(8, 4)


def loss(batch):
    step, x = batch
    return model(x).sum() * (float("nan") if rank == 1 and step == 3 and phase == "forward" else 1.0), {}


stops = 0
for phase in ("loading", "forward", "signal"):            # a training step as fit() runs it, each phase
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    model = lofi.ddp(net, torch.device("cpu"))            # as fit() wraps a model
    try:
        it = batches(phase)
        for step in range(50):                            # "signal": rank 1 is sent SIGTERM (15) before step 3
            told = [15] if phase == "signal" and rank == 1 and step >= 3 else []
            _, total, _, stop = lofi.forward_step(it, loss, step, torch.device("cpu"), signals=told)
            total.backward()                              # DDP's all_reduce: a lone healthy rank waits here
            if stop:
                print(f"signal {stop} at step {step}", file=sys.stderr, flush=True)
                break
    except SystemExit as stop:                            # every rank: the next phase, in the same group
        print(stop, file=sys.stderr, flush=True)
        stops += 1
dist.destroy_process_group()
raise SystemExit(stops)
"""


def test_a_failing_rank_stops_every_rank_with_its_reason(tmp_path):
    """Two gloo processes started by hand (no torchrun to end the others), a DDP model with BatchNorm:
    rank 1 fails at step 3, while loading, then (a second model) in its forward pass; both ranks stop that
    training within seconds each time, naming rank 1's reason. Then rank 1 alone is told to stop (a signal):
    both ranks learn it in the same step."""
    (tmp_path / "ranks.py").write_text(RANK_SCRIPT)
    codes, errs = run_ranks([tmp_path / "ranks.py", ROOT], tmp_path / "logs")
    for code, err in zip(codes, errs):
        assert code == 2, err[-2000:]                                    # both phases stopped
        for reason in ("step 3, loading: RuntimeError: the disk of rank 1 is on fire",
                       "step 3: FloatingPointError: non-finite loss"):
            assert f"stopped, a rank failed: rank 1: {reason}" in err, err[-2000:]
        assert "signal 15 at step 3" in err, err[-2000:]


def same_end_state(tmp_path, stage, other="killed"):
    """<tmp>/straight and <tmp>/<other> end alike: weights, optimizer state and logged losses."""
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("straight", other))
    assert a["epoch"] == b["epoch"] == 2
    for part in ("encoder", "head" if stage == "lofi" else "classifier", "optimizer"):
        flat_a, flat_b = (torch.utils._pytree.tree_leaves(x[part]) for x in (a, b))
        assert len(flat_a) == len(flat_b) > 0
        assert all(torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(flat_a, flat_b)), part
    logs = [[{k: v for k, v in json.loads(line).items() if k != "time"} for line in open(tmp_path / d / "log.jsonl")]
            for d in ("straight", other)]
    assert logs[0] == logs[1] and len(logs[0]) == 2                  # the resumed epoch's mean includes its first steps


AT_STEP = """
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import data, lofi, tsm
rank, where, at, act, flag = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], Path(sys.argv[6])
real_step, real_save, real_encode, told, encoded = lofi.forward_step, data.atomic_save, tsm.encode, [], []


def now():                                                         # this rank, at its step
    told.append(act)
    if act == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        os.kill(os.getpid(), signal.SIGKILL)                     # a lost rank, the first time
    if act == "wait":                                              # for the test's signal (or its go-ahead)
        flag.touch()
        while not lofi.SIGNALS and not flag.with_suffix(".go").exists():
            time.sleep(0.005)


def forward_step(it, loss_fn, step, device, here, *rest):         # as fit() calls it
    if os.environ.get("RANK", "0") == rank and where in here and step == at and not told:
        now()
    return real_step(it, loss_fn, step, device, here, *rest)


def encode(encoder, frames):                                       # where "extract": its at-th batch
    encoded.append(1)
    if os.environ.get("RANK", "0") == rank and where == "extract" and len(encoded) == at + 1:
        now()
    return real_encode(encoder, frames)


def atomic_save(path, write):                                      # a second signal while last.pt is written
    def with_a_signal(f):
        write(f)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
    real_save(path, with_a_signal if lofi.SIGNALS and path.name == "last.pt" else write)   # (after a first)


lofi.forward_step, data.atomic_save, tsm.encode = forward_step, atomic_save, encode
lofi.main(sys.argv[7:])
"""


def at_step(tmp_path, rank, where, step, act="wait"):
    """The AT_STEP script's first arguments: rank `rank` of a lofi.py run, at `step` of the epoch `where` names
    (where "extract": at its step-th batch of features), waits for a signal (touching <tmp>/at_step, go on:
    <tmp>/at_step.go), or SIGKILLs itself."""
    (tmp_path / "at_step.py").write_text(AT_STEP)
    return [tmp_path / "at_step.py", ROOT, rank, where, step, act, tmp_path / "at_step"]


def waiting(tmp_path, procs, timeout=120):
    """Until the AT_STEP run waits at its step."""
    deadline = time.time() + timeout
    while not (tmp_path / "at_step").exists():
        assert time.time() < deadline and all(p.is_alive() for p in procs), "the run died before its step"
        time.sleep(0.005)


def stop_by_signal(procs, pid, tmp_path):
    """SIGTERM to `pid` (a waiting AT_STEP run's process): every process exits with lofi.PREEMPTED within 30 s."""
    t0 = time.time()
    os.kill(pid, signal.SIGTERM)
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [lofi.PREEMPTED] * len(procs) and time.time() - t0 < 30


# One loop trains every stage: stage 1 in one process and stage 2 in ranks cover its resume.
def test_killed_preempted_or_restarted_ranks_end_as_an_undisturbed_run(synth, tmp_path):
    """Stage 2 in 2 rank processes; every way it can stop must end, resumed, with the weights, optimizer
    state and logged losses of an uninterrupted run:
    - SIGKILL to both once a --save-every 1 checkpoint exists, then --resume;
    - SIGTERM to rank 1 alone, mid-epoch, no --save-every: both ranks save that step and exit with PREEMPTED
      within 30 s; then --resume;
    - torchrun --max-restarts 1, rank 1 SIGKILLed at a random mid-epoch step: the same command line, no flag
      changed, continues the job from its --save-every checkpoint."""
    base = [ROOT / "lofi.py", "--stage", "lofi", *SMALL, *synth, "--epochs", "2", "--max-steps", "2"]
    argv = [*base, "--save-every", "1"]
    codes, errs = run_ranks([*argv, "--out", tmp_path / "straight"], tmp_path / "logs0")
    assert codes == [0, 0], errs[0][-3000:]
    assert "\r" not in errs[0]                                            # no progress bars into a pipe
    ckpt = tmp_path / "killed" / "last.pt"
    procs = start_ranks([*argv, "--out", tmp_path / "killed"], tmp_path / "logs1")
    deadline = time.time() + 120
    while not ckpt.exists() and all(p.is_alive() for p in procs) and time.time() < deadline:
        time.sleep(0.005)
    for p in procs:
        p.kill()                                                          # SIGKILL
        p.join()
    at = torch.load(ckpt, weights_only=True)
    assert at["epoch"] == 0 and at["step"] >= 1, (at["epoch"], at["step"])      # killed inside epoch 0
    codes, outs = run_ranks([*argv, "--out", tmp_path / "killed", "--resume"], tmp_path / "logs2")
    assert codes == [0, 0] and f"step {at['step']}" in outs[0], outs[0][-3000:]
    same_end_state(tmp_path, "lofi")
    procs = start_ranks([*at_step(tmp_path, "1", "epoch 1:", 0), *base[1:], "--out", tmp_path / "termed"],
                        tmp_path / "logs3")                                  # SIGTERM to one rank
    waiting(tmp_path, procs)
    stop_by_signal(procs, procs[1].pid, tmp_path)
    at = torch.load(tmp_path / "termed" / "last.pt", weights_only=True)
    assert (at["epoch"], at["step"]) == (1, 1)
    assert "SIGTERM: stopped at epoch 1, step 1; the same command with --resume" in \
        (tmp_path / "logs3" / "rank0.log").read_text()
    codes, errs = run_ranks([*base, "--out", tmp_path / "termed", "--resume"], tmp_path / "logs4")
    assert codes == [0, 0], errs[0][-3000:]
    same_end_state(tmp_path, "lofi", "termed")
    epoch = int(np.random.default_rng().integers(2))                      # step 1: the mid-epoch one of 2
    lost = map(str, at_step(tmp_path, "1", f"epoch {epoch}:", 1, "kill"))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--max-restarts=1", *lost, *argv[1:], "--out", tmp_path / "restarted"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and f"resumed from {tmp_path / 'restarted' / 'last.pt'} at epoch {epoch}, step 1" \
        in run.stdout, (epoch, run.stderr[-3000:])
    same_end_state(tmp_path, "lofi", "restarted")


def test_a_run_is_never_overwritten_unasked(synth, tmp_path, capsys, monkeypatch):
    """A second run into an occupied folder is refused (exit 2, one line naming the folder, both flags and the
    last epoch), its last.pt untouched; --overwrite starts it again, --resume continues it. One job at a time
    in a folder; a torchrun restart continues only its own job."""
    out = tmp_path / "run"
    argv = ["--stage", "lofi", *SMALL, *synth, "--max-steps", "1", "--out", str(out)]
    lofi.main([*argv, "--epochs", "1"])
    before = (out / "last.pt").read_bytes()
    codes, errs = run_ranks([ROOT / "lofi.py", *argv, "--epochs", "1"], tmp_path / "logs", n=1)   # a real process
    line = [x for x in errs[0].splitlines() if x.startswith("lofi.py: error: ")]      # (stdout: --init says why)
    assert codes == [2] and len(line) == 1 and "Traceback" not in errs[0], errs[0][-2000:]
    assert all(w in line[0] for w in (f"--out {out}: holds a run", "last logged epoch 0", "--resume", "--overwrite"))
    assert (out / "last.pt").read_bytes() == before
    assert "not both" in refused([*argv, "--resume", "--overwrite"], capsys)
    lofi.main([*argv, "--epochs", "1", "--overwrite"])                 # started again: one epoch logged, not two
    assert [json.loads(x)["epoch"] for x in open(out / "log.jsonl")] == [0]
    lofi.main([*argv, "--epochs", "2", "--resume"])
    assert [json.loads(x)["epoch"] for x in open(out / "log.jsonl")] == [0, 1]
    # Two jobs at once: while one runs (it waits at a step), a second is refused, --overwrite and --resume
    # alike, in this process and as 2 ranks (rank 0 asks for the lock, both follow); the first completes.
    job = start_plain([*at_step(tmp_path, "0", "epoch 2:", 0), *argv, "--epochs", "3", "--resume"], tmp_path / "a.log")
    waiting(tmp_path, [job])
    t0 = time.time()
    line = refused([*argv, "--epochs", "1", "--overwrite"], capsys)
    assert line == f"lofi.py: error: --out {out}: another job is running in it (it holds {out / 'lock'})"
    codes, errs = run_ranks([ROOT / "lofi.py", *argv, "--epochs", "3", "--resume"], tmp_path / "logs2")
    assert codes == [2, 2] and all(line in e for e in errs) and time.time() - t0 < 30, errs
    (tmp_path / "at_step.go").touch()
    job.join(60)
    assert job.exitcode == 0 and [json.loads(x)["epoch"] for x in open(out / "log.jsonl")] == [0, 1, 2]
    # SIGKILLed while its loader worker lives on, a job leaves its folder free at once (its lock was its own).
    (tmp_path / "at_step").unlink()
    job = start_plain([*at_step(tmp_path, "0", "epoch 3:", 0), *argv, "--epochs", "4", "--resume", "--workers", "1"],
                      tmp_path / "b.log", daemon=False)
    waiting(tmp_path, [job])
    job.kill()
    job.join()
    lofi.main([*argv, "--epochs", "4", "--resume"])
    assert [json.loads(x)["epoch"] for x in open(out / "log.jsonl")] == [0, 1, 2, 3]
    # A torchrun restart continues its own job's folder, no flag given; another job's it refuses.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    lofi.main([*argv, "--epochs", "5", "--resume"])                      # attempt 0 of job-1, here
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    lofi.main([*argv, "--epochs", "6"])                                   # its restart
    assert [json.loads(x)["epoch"] for x in open(out / "log.jsonl")] == [0, 1, 2, 3, 4, 5]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")                    # (torchrun's id without --rdzv-id)
    assert f"--out {out}: holds a run" in refused([*argv, "--epochs", "7"], capsys)


FILE_LIMIT = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_failed_checkpoint_write_keeps_the_last_one(synth, tmp_path):
    """A checkpoint that cannot be written (files capped below its size: EFBIG, as ENOSPC on a full disk)
    stops the run with one line naming the file, exit 2, and the previous last.pt loads as it was."""
    out = tmp_path / "run"
    argv = ["--stage", "lofi", *SMALL, *synth, "--max-steps", "1", "--out", str(out)]
    lofi.main([*argv, "--epochs", "1"])
    before = (out / "last.pt").read_bytes()
    (tmp_path / "limit.py").write_text(FILE_LIMIT)
    codes, errs = run_ranks([tmp_path / "limit.py", len(before) // 2, ROOT / "lofi.py", *argv, "--epochs", "2",
                             "--resume"], tmp_path / "logs", n=1)
    line = errs[0].strip().splitlines()[-1]
    assert codes == [2] and "Traceback" not in errs[0], errs[0][-2000:]
    assert line.startswith(f"lofi.py: error: {out / 'last.pt'}: not written (") and "File too large" in line, line
    assert (out / "last.pt").read_bytes() == before and torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert not list(out.glob("*.tmp"))                                  # and no half-written file beside it


class Killed(BaseException):
    """Not an Exception: nothing in lofi.py may catch it, as nothing catches a SIGKILL."""


def test_stage_1_stopped_mid_epoch_resumes_to_the_same_weights(synth, tmp_path, monkeypatch, capsys):
    """Stage 1 in this process (the SIGKILL of a real process is the test above), --save-every 1: the run stops
    dead right after its first mid-epoch checkpoint is on disk; --resume must end with the weights, optimizer
    state and logged losses of an uninterrupted run."""
    argv = ["--stage", "acp", *SMALL, *synth, "--epochs", "2", "--max-steps", "3"]
    lofi.main([*argv, "--out", str(tmp_path / "straight")])
    assert "\r" not in capsys.readouterr().err                            # no progress bars off a terminal
    ckpt, real = tmp_path / "killed" / "last.pt", data.atomic_save

    def dies_after_a_mid_epoch_save(path, write):
        real(path, write)
        if Path(path) == ckpt and torch.load(path, weights_only=True)["step"] >= 1:
            raise Killed
    monkeypatch.setattr(data, "atomic_save", dies_after_a_mid_epoch_save)
    with pytest.raises(Killed):
        lofi.main([*argv, "--out", str(tmp_path / "killed"), "--save-every", "1"])
    monkeypatch.setattr(data, "atomic_save", real)
    at = torch.load(ckpt, weights_only=True)
    assert at["epoch"] == 0 and at["step"] >= 1, (at["epoch"], at["step"])      # stopped inside epoch 0
    capsys.readouterr()
    lofi.main([*argv, "--out", str(tmp_path / "killed"), "--resume"])
    said = capsys.readouterr()
    assert f"step {at['step']}" in said.out, said.err[-3000:]
    same_end_state(tmp_path, "acp")


def test_sigterm_saves_the_step_and_resumes_to_the_same_weights(synth, tmp_path):
    """Stage 1 in a plain process, no --save-every: SIGTERM from outside mid-epoch (and a SIGUSR1 while it
    saves), then at an epoch's last step -> exit PREEMPTED within 30 s, a checkpoint at the step it reached, a
    line saying how to go on; --resume ends with the weights, optimizer state and logged losses of an
    uninterrupted run."""
    argv = ["--stage", "acp", *SMALL, *synth, "--epochs", "2", "--max-steps", "3"]
    straight = start_plain([ROOT / "lofi.py", *argv, "--out", tmp_path / "straight"], tmp_path / "straight.log")
    straight.join()                                                         # (one thread, as the runs below)
    assert straight.exitcode == 0
    for where, step in (("epoch 1:", 1), ("epoch 0:", 2)):                  # mid-epoch; an epoch's last step
        out = tmp_path / "termed"
        shutil.rmtree(out, ignore_errors=True)
        (tmp_path / "at_step").unlink(missing_ok=True)
        job = start_plain([*at_step(tmp_path, "0", where, step), *argv, "--out", out], tmp_path / "termed.log")
        waiting(tmp_path, [job])
        stop_by_signal([job], job.pid, tmp_path)
        said = (tmp_path / "termed.log").read_text()
        assert f"lofi.py: SIGTERM: stopped at {where[:-1]}, step {step + 1}; the same command with --resume " \
            "continues it" in said, said[-3000:]
        at = torch.load(out / "last.pt", weights_only=True)
        assert (at["epoch"], at["step"]) == (int(where[6]), step + 1) and not list(out.glob("*.tmp"))
        again = start_plain([ROOT / "lofi.py", *argv, "--out", out, "--resume"], tmp_path / "resumed.log")
        again.join()
        assert again.exitcode == 0, (tmp_path / "resumed.log").read_text()[-3000:]
        same_end_state(tmp_path, "acp", "termed")


def test_the_design_card_command_finds_train_sh_outputs(tmp_path, monkeypatch):
    """`lofi.py --stage lofi --cycle long` with no other flag, run where bash train.sh ran: its synthetic set,
    its stage-1 checkpoint, runs/lofi, and the preset of the machine."""
    (tmp_path / "data" / "synth" / "videos").mkdir(parents=True)
    (tmp_path / "data" / "synth" / "anno.json").write_text(json.dumps({"database": {"a": {
        "subset": "training", "duration": 5.0, "annotations": [{"segment": [1, 2], "label": "x"}]}}}))
    (tmp_path / "runs" / "acp").mkdir(parents=True)
    torch.save({"stage": "acp", "encoder": {}}, tmp_path / "runs" / "acp" / "last.pt")
    monkeypatch.chdir(tmp_path)
    args, _ = lofi.get_args(["--stage", "lofi", "--cycle", "long"])
    assert (args.anno, args.videos, args.out, args.init) == ("data/synth/anno.json", "data/synth/videos", "runs/lofi",
                                                             "runs/acp/last.pt")
    assert args.preset == ("paper" if torch.cuda.is_available() else "tiny")
    assert lofi.get_args(["--stage", "head"])[0].init == "none"                 # no runs/lofi/last.pt yet: random


def test_killed_feature_extraction_resumes_from_its_files(synth, tmp_path, monkeypatch):
    """Stage 3 writes one feature file a video as it goes: a run killed after 4 videos leaves 4 files,
    the next run computes only the other videos, and every file and the head equal an uninterrupted run's."""
    argv = ["--stage", "head", *SMALL, *synth, "--epochs", "1", "--batch-size", "1"]
    lofi.main([*argv, "--out", str(tmp_path / "straight")])
    real, calls = tsm.encode, []

    def dies_after_4(encoder, frames):
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        calls.append(frames.shape[0])
        return real(encoder, frames)
    monkeypatch.setattr(tsm, "encode", dies_after_4)
    with pytest.raises(KeyboardInterrupt):
        lofi.main([*argv, "--out", str(tmp_path / "killed")])
    assert len(list((tmp_path / "killed" / "features").glob("*.npy"))) == 4
    calls.clear()
    monkeypatch.setattr(tsm, "encode", lambda e, f: calls.append(f.shape[0]) or real(e, f))
    lofi.main([*argv, "--out", str(tmp_path / "killed")])
    a, b = (sorted((tmp_path / d / "features").glob("*.npy")) for d in ("straight", "killed"))
    assert len(calls) == len(a) - 4 == 4 and [f.name for f in a] == [f.name for f in b]
    assert all(np.array_equal(np.load(f), np.load(g)) for f, g in zip(a, b))
    # Its head, and the head of a run that finds every file there, equal the uninterrupted run's.
    head = params(tmp_path / "straight" / "last.pt", "head")
    same = lambda: all(torch.equal(head[k], v) for k, v in params(tmp_path / "killed" / "last.pt", "head").items())
    assert same()
    calls.clear()
    lofi.main([*argv, "--out", str(tmp_path / "killed"), "--overwrite"])
    assert calls == [] and same()


# ---------------- --stage extract: features for other heads
# Snippets of 2 frames at stride 2 (num_frames 4) every 3 frames: they overlap; one encoder pass a video.
EXTRACT = ["--stage", "extract", *SMALL, "--feat-stride", "3", "--snippets", "128", "--init", "none",
           "--max-bad", "0.5"]


@pytest.fixture(scope="module")
def extracted(synth, tmp_path_factory):
    """--stage extract of the synthetic videos less a validation one, on one thread as each rank
    of the two-rank run -> (its folder: videos/, features/; the video left out)."""
    root, videos = tmp_path_factory.mktemp("extract"), data.read_annotations(synth[1])[0]
    gone = min(v for v in videos if videos[v].subset == "validation")
    (root / "videos").mkdir()
    for f in Path(synth[3]).iterdir():
        if f.stem != gone:
            (root / "videos" / f.name).symlink_to(f)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lofi.main([*EXTRACT, "--anno", synth[1], "--videos", str(root / "videos"), "--out", str(root / "features")])
    finally:
        torch.set_num_threads(threads)
    return root, gone


def test_extract_covers_every_decoded_frame_with_the_encoders_snippet_features(extracted, synth):
    root, gone = extracted
    out, videos = root / "features", data.read_annotations(synth[1])[0]
    index = json.load(open(out / "features.json"))
    assert {k: index[k] for k in ("feat_stride", "num_frames", "size", "dtype")} == dict(
        feat_stride=3, num_frames=4, size=32, dtype="float32") and index["encoder"]["stage"] == "none"
    assert sorted(index["videos"]) == sorted(v for v in videos if v != gone)
    assert (out / "missing_files.txt").read_text() == f"{gone}\n"             # OpenTAD's block list
    torch.manual_seed(3)                                                     # --init none, --seed 3
    encoder = tsm.build_encoder(18, "none")[0].eval()
    for vid, record in index["videos"].items():
        cap = cv2.VideoCapture(str(root / "videos" / f"{vid}.mp4"))          # the reference: every frame, in order
        frames = []
        while (read := cap.read())[0]:
            frames.append(read[1])
        n, x = len(frames), np.load(out / f"v_{vid}.npy")
        T = next(t for t in range(1, n + 1) if (t - 1) * 3 + 4 >= n)         # the fewest snippets reaching frame n - 1
        assert T == 1 + max(0, math.ceil((n - 4) / 3))                       # the stated formula
        assert (record["frames"], record["fps"], record["T"], x.shape) == (n, 10.0, T, (T, 512))
        # Snippet k is frames 3k + 2j (past the end: the last), the encoder's feature of that clip alone.
        for k in (0, T // 2, T - 1):
            clip = np.stack([data.fit_frame(frames[min(3 * k + 2 * j, n - 1)], (32, 32))[..., ::-1].transpose(2, 0, 1)
                             for j in range(2)])                             # (F, 3, H, W) RGB
            with torch.no_grad():
                want = tsm.encode(encoder, torch.from_numpy(np.ascontiguousarray(clip))[None, None])[0, 0]  # (D,)
            torch.testing.assert_close(torch.from_numpy(x[k]), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_head_trains_and_evaluates_on_extracted_features(extracted, synth, tmp_path, capsys):
    root, gone = extracted
    out, videos = root / "features", data.read_annotations(synth[1])[0]
    lofi.main(["--stage", "head", *SMALL, "--anno", synth[1], "--features", str(out), "--out", str(tmp_path / "head"),
               "--epochs", "2", "--max-bad", "0.5"])
    log = [json.loads(line) for line in open(tmp_path / "head" / "log.jsonl")]
    assert [r["epoch"] for r in log] == [0, 1] and all(np.isfinite(r["total"]) for r in log)
    dets = json.load(open(tmp_path / "head" / "detections.json"))["results"]
    assert set(dets) == {v for v, a in videos.items() if a.subset == "validation" and v != gone}
    assert 0 <= json.load(open(tmp_path / "head" / "metrics.json"))["average-mAP"] <= 1
    assert "on the 1 of 2 validation videos with features" in capsys.readouterr().out
    # The head's L = 12 bins tile each video's n frames: bin i samples snippet position ((i + 0.5) n / 12 - 2) / 3.
    vid = sorted(dets)[0]
    n, x = json.load(open(out / "features.json"))["videos"][vid]["frames"], np.load(out / f"v_{vid}.npy")
    want = []
    for i in range(12):
        u = min(max(((i + 0.5) * n / 12 - 4 / 2) / 3, 0), len(x) - 1)
        lo = int(u)
        want.append(x[lo] * (1 - (u - lo)) + x[min(lo + 1, len(x) - 1)] * (u - lo))
    want = np.array(want, np.float64)                                       # (L, D), then layer-normalised
    want = (want - want.mean(1, keepdims=True)) / np.sqrt(want.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(gtad.read_features(out, [videos[vid]], 12)[vid].numpy().T, want, rtol=0, atol=1e-4)


def test_killed_or_preempted_extraction_resumes_and_two_ranks_write_the_same(extracted, synth, tmp_path, monkeypatch, capsys):
    root, _ = extracted
    argv = [*EXTRACT, "--anno", synth[1], "--videos", str(root / "videos")]
    straight = sorted((root / "features").glob("v_*.npy"))
    index = json.load(open(root / "features" / "features.json"))
    # SIGKILL in the 4th video, features.json saved after each (--save-every 1): 3 files and records survive.
    proc = start_plain([*at_step(tmp_path, "0", "extract", 3), *argv, "--out", tmp_path / "killed", "--save-every",
                        "1"], tmp_path / "killed.log")
    waiting(tmp_path, [proc])
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert len(json.load(open(tmp_path / "killed" / "features.json"))["videos"]) == 3
    real, calls = tsm.encode, []
    monkeypatch.setattr(tsm, "encode", lambda e, f: calls.append(1) or real(e, f))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                                # (as the reference ran)
    try:
        lofi.main([*argv, "--out", str(tmp_path / "killed")])                # the same command: it resumes
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == len(straight) - 3
    # Two ranks, float16: the same files, halved.
    codes, errs = run_ranks([ROOT / "lofi.py", *argv, "--out", tmp_path / "two", "--float16"], tmp_path / "logs")
    assert codes == [0, 0], errs[0][-3000:]
    # SIGTERM to rank 1 alone in its 2nd video: both ranks stop after that step (exit 3), 4 files stay, and the
    # same command makes the rest.
    (tmp_path / "at_step").unlink()                                         # (the killed run's)
    procs = start_ranks([*at_step(tmp_path, "1", "extract", 1), *argv, "--out", tmp_path / "cut"], tmp_path / "logs1")
    waiting(tmp_path, procs)
    stop_by_signal(procs, procs[1].pid, tmp_path)
    said = (tmp_path / "logs1" / "rank0.log").read_text()
    assert "lofi.py: SIGTERM: stopped extracting training features; the same command" in said, said
    assert len(list((tmp_path / "cut").glob("v_*.npy"))) == 4
    codes, errs = run_ranks([ROOT / "lofi.py", *argv, "--out", tmp_path / "cut"], tmp_path / "logs2")
    assert codes == [0, 0], errs[0][-3000:]
    for other, dtype in (("killed", np.float32), ("two", np.float16), ("cut", np.float32)):
        files = sorted((tmp_path / other).glob("v_*.npy"))
        assert [f.name for f in files] == [f.name for f in straight]
        assert all(np.array_equal(np.load(f), np.load(g).astype(dtype)) for f, g in zip(files, straight))
        assert json.load(open(tmp_path / other / "features.json"))["videos"] == index["videos"]
    # Another layout in the folder is refused, not mixed in; a store cannot give dense snippets.
    assert "features of another layout" in refused([*argv, "--out", str(tmp_path / "two")], capsys)
    assert "a store holds --snippets snippets a video" in refused([*EXTRACT, "--anno", synth[1], "--store",
                                                                   str(tmp_path)], capsys)


def test_extract_never_writes_over_what_it_did_not_make(extracted, synth, tmp_path, capsys, monkeypatch):
    root, _ = extracted
    argv = [*EXTRACT, "--anno", synth[1], "--videos", str(root / "videos"), "--subset", "validation"]
    run = tmp_path / "run"                                                   # a stage-3 run folder: its checkpoint
    run.mkdir()
    (run / "last.pt").write_bytes(b"weights")
    for flag in ([], ["--overwrite"], ["--resume"]):                          # not even when asked
        assert "holds a run's last.pt: not for features" in refused([*argv, "--out", str(run), *flag], capsys)
    assert os.listdir(run) == ["last.pt"] and (run / "last.pt").read_bytes() == b"weights"
    foreign = tmp_path / "foreign"                                          # another toolbox's features, no index
    foreign.mkdir()
    np.save(foreign / "v_x.npy", np.ones((3, 4), np.float32))
    assert "no such file, but .npy files of an unknown layout" in refused([*argv, "--out", str(foreign)], capsys)
    (foreign / "features.json").write_text("[1, 2")                          # a cut index
    assert "unreadable" in refused([*argv, "--out", str(foreign)], capsys)
    assert (foreign / "v_x.npy").exists()
    lofi.main([*argv, "--out", str(foreign), "--overwrite"])                   # asked: made anew
    assert not (foreign / "v_x.npy").exists() and json.load(open(foreign / "features.json"))["videos"]
    # Features float16 cannot hold: refused by name, not written.
    monkeypatch.setattr(tsm, "encode", lambda e, f: torch.full((1, len(f[0]), 512), 1e6))
    assert "not finite in float16" in refused([*argv, "--out", str(tmp_path / "half"), "--float16"], capsys)
    assert not list((tmp_path / "half").glob("v_*.npy"))
    # A file features.json does not record (its run killed before it saved) is missing to --features.
    videos = data.read_annotations(synth[1])[0]
    index = json.load(open(foreign / "features.json"))
    vid = next(iter(index["videos"]))
    (foreign / "features.json").write_text(json.dumps(dict(index, videos={})))
    with pytest.raises(ValueError, match=f"no record in its features.json.*{vid}"):
        gtad.read_features(foreign, [videos[vid]], 12)


# ---------------- stage 3 on precomputed features
def test_rescale_is_linear_interpolation_between_snippet_centres():
    x = torch.tensor([[0.0, 10.0, 20.0, 40.0]])                                  # (D = 1, T = 4)
    # L = 2: positions (i + 0.5) * 4 / 2 - 0.5 = 0.5, 2.5 -> halfway between inputs 0-1 and 2-3.
    assert torch.allclose(gtad.rescale(x, 2), torch.tensor([[5.0, 30.0]]))
    # L = 8: positions -0.25 (clamped to 0), 0.25, 0.75, 1.25, ..., 3.25 (clamped to 3).
    want = [0.0, 2.5, 7.5, 12.5, 17.5, 25.0, 35.0, 40.0]
    assert torch.allclose(gtad.rescale(x, 8), torch.tensor([want]))
    assert torch.equal(gtad.rescale(x, 4), x)


def ground_truth_features(video, T, classes, projection, rng, noise=0.1):
    """(T, D) oracle features: at each snippet centre a one-hot of the class being performed, or of a
    background column outside every instance, through a fixed random projection, plus mild noise."""
    centre = (np.arange(T) + 0.5) / T * video.duration                               # (T,) seconds
    onehot = np.zeros((T, len(classes) + 1))
    onehot[:, -1] = 1
    for (s, e), label in zip(video.segments, video.labels):
        inside = (centre >= s) & (centre < e)
        onehot[inside] = 0
        onehot[inside, classes.index(label)] = 1
    return (onehot @ projection + noise * rng.standard_normal((T, projection.shape[1]))).astype(np.float32)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """A 64-video synthetic set with ground-truth features in --features files (T varies with the video,
    half the files named v_<id>.npy); no video is read."""
    root = tmp_path_factory.mktemp("oracle")
    anno = synthetic.synth(root, videos=64, seed=5)
    videos, _ = data.read_annotations(anno)
    classes = data.class_names(videos)
    rng = np.random.default_rng(0)
    projection = rng.standard_normal((len(classes) + 1, 48))                         # (K + 1, D)
    (root / "features").mkdir()
    for i, v in enumerate(sorted(videos.values(), key=lambda v: v.id)):
        T = int(v.duration * 10) // 4                                                 # one snippet per 4 frames
        name = f"v_{v.id}.npy" if i % 2 else f"{v.id}.npy"
        np.save(root / "features" / name, ground_truth_features(v, T, classes, projection, rng))
    return root


def test_oracle_features_through_stage_3_reach_a_high_map(oracle, tmp_path, capsys):
    """The head path (targets, G-TAD training, decoding, class assignment, evaluation) on ground-truth
    features at L = 24, 4 epochs: an encoder-independent ceiling. Measured 0.83 average mAP; a broken path gives ~0."""
    out = tmp_path / "head"
    lofi.main(["--stage", "head", "--preset", "tiny", "--anno", str(oracle / "anno.json"), "--features",
               str(oracle / "features"), "--out", str(out), "--workers", "0", "--epochs", "4", "--snippets", "24"])
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["average-mAP"] >= 0.7, metrics
    # The head has no encoder: stage detect says so instead of failing inside torch.
    assert "precomputed features" in refused(["--stage", "detect", "--run", str(out), "--video",
                                              str(next((oracle / "videos").iterdir()))], capsys)
    assert "holds no encoder (a head trained on precomputed features)" in refused([
        "--stage", "extract", "--preset", "tiny", "--anno", str(oracle / "anno.json"), "--init", str(out / "last.pt"),
        "--out", str(tmp_path / "features"), "--workers", "0"], capsys)


def test_bad_feature_files_are_refused_by_name(oracle, tmp_path, capsys):
    feats = tmp_path / "features"
    feats.mkdir()
    files = sorted((oracle / "features").iterdir())
    for f in files[1:]:
        (feats / f.name).write_bytes(f.read_bytes())
    args = ["--stage", "head", "--preset", "tiny", "--anno", str(oracle / "anno.json"), "--features", str(feats),
            "--out", str(tmp_path / "head"), "--workers", "0"]
    # A missing file is skipped with a record (test_missing_...); with --max-bad 0 it stops the run, by id.
    assert re.search(r"1 of \d+ \w+ videos have no file .*" + files[0].stem.removeprefix("v_"),
                     refused([*args, "--max-bad", "0"], capsys))
    np.save(feats / files[0].name, np.zeros((20, 7), np.float32))                      # D = 7, the others 48
    assert re.search(r"D = (7|48), but .* has D = (48|7)", refused(args, capsys))
    np.save(feats / files[0].name, np.zeros(20, np.float32))
    assert re.search(r"expected a finite \(T, D\) array", refused(args, capsys))


def test_lr_search_scores_held_out_training_videos_only(oracle, tmp_path, monkeypatch):
    scored = []
    real = lofi.evaluate.detection_map

    def spy(gt, pred, *a, **k):
        if isinstance(gt, dict):                                   # the search's own ground truth
            scored.append(set(gt["database"]))
        return real(gt, pred, *a, **k)
    monkeypatch.setattr(lofi.evaluate, "detection_map", spy)
    out = tmp_path / "head"
    lofi.main(["--stage", "head", "--preset", "tiny", "--anno", str(oracle / "anno.json"), "--features",
               str(oracle / "features"), "--out", str(out), "--workers", "0", "--epochs", "1", "--snippets", "12",
               "--batch-size", "16", "--lr-search"])
    anno = json.load(open(oracle / "anno.json"))["database"]
    training = {k for k, v in anno.items() if v["subset"] == "training"}
    assert len(scored) == len(lofi.LR_GRID)                       # one score per lr of the paper's set
    assert all(s == scored[0] and s < training and len(s) == len(training) // 10 for s in scored)
    assert json.load(open(out / "args.json"))["lr"] in lofi.LR_GRID


def test_bn_recal_averages_full_fidelity_batch_statistics(synth, tmp_path):
    """The stem BatchNorm's running mean after --bn-recal N equals the mean, over the N videos, of
    each video's batch mean of the stem convolution, computed here directly from the frames."""
    lofi.main(["--stage", "acp", *SMALL, *synth, "--out", str(tmp_path / "acp"), "--epochs", "1"])
    lofi.main(["--stage", "head", *SMALL, *synth, "--out", str(tmp_path / "head"), "--epochs", "1",
               "--init", str(tmp_path / "acp" / "last.pt"), "--bn-recal", "3"])
    before, after = (params(tmp_path / d / "last.pt", "encoder") for d in ("acp", "head"))
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])          # weights untouched
    args, inputs = lofi.get_args(["--stage", "head", *SMALL, *synth, "--out", str(tmp_path / "x")])
    train = lofi.videos_of(args, inputs, "training").videos
    pick = np.random.default_rng([args.seed, 11]).permutation(len(train))[:3]
    ds = lofi.tal_dataset(args, inputs, [train[i] for i in sorted(pick)])
    means = []
    for i in range(len(ds)):
        frames = ds[i]["frames"].flatten(0, 1)                                   # (L*F, 3, H, W)
        y = torch.nn.functional.conv2d(lofi.tsm.normalize(frames), before["conv1.weight"], stride=2, padding=3)
        means.append(y.mean((0, 2, 3)))
    torch.testing.assert_close(after["bn1.running_mean"], torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)
