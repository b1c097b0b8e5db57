"""lofi.py: the three stages end to end on synthetic videos, DDP parity, exact resume, bad data."""
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import data
import gtad
import lofi
from conftest import ROOT

# Small enough for seconds a stage on a CPU: 12 snippets x 2 frames x 32^2 at full fidelity.
SMALL = ["--preset", "tiny", "--snippets", "12", "--frames", "2", "--stride", "2", "--size", "32",
         "--batch-size", "2", "--workers", "0", "--seed", "3"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    data.synth(root, videos=8, seed=1)
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
    # Features are reused when encoder, fidelity and videos match.
    mtime = os.path.getmtime(tmp_path / "head" / "features.pt")
    lofi.main(["--stage", "head", *SMALL, *synth, "--out", str(tmp_path / "head"), "--epochs", "1",
               "--init", str(tmp_path / "lofi" / "last.pt")])
    assert os.path.getmtime(tmp_path / "head" / "features.pt") == mtime
    # Stage detect on one validation video: JSON with detections, a timeline PNG of the drawn size.
    vid = sorted(dets)[0]
    video = data.find_video(synth[3], vid)
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "lofi.py"), *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    args = lofi.get_args(argv)
    torch.manual_seed(args.seed)                      # rank 0's initial weights, which DDP broadcasts
    net = lofi.LoFiNet(enc := lofi.build_encoder(args), gtad.GTAD(gtad.GTADConfig(feat_dim=enc.dim)))
    net.train()
    lofi.set_bn_eval(net)
    train, _ = lofi.load_split(args, "training")
    args.cache = "none"
    ds = lofi.tal_dataset(args, train)
    _, configs = lofi.fidelity_grid(args)
    for rank in (0, 1):
        sampler = data.FidelityBatchSampler(len(ds), 2, configs, "short", rank=rank, world_size=2, seed=args.seed)
        sampler.set_epoch(0)
        batch = data.collate([ds[i] for i in next(iter(sampler))])
        labels = lofi.batch_targets(batch["segments"], batch["fidelity"].L, "cpu")
        losses = gtad.loss(net(batch["frames"]), *labels, generator=lofi.loss_generator(args, rank, 0, 0, "cpu"))
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


def test_torchrun_one_process_equals_plain_python(synth, tmp_path):
    argv = ["--stage", "lofi", *SMALL, *synth, "--epochs", "1", "--max-steps", "2", "--cache", "none"]
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
    argv = ["--stage", "lofi", *SMALL, *synth, "--cache", "none", "--epochs", "1"]
    pattern = r"last\.pt: not a readable PyTorch checkpoint"
    assert re.search(pattern, refused([*argv, "--out", str(out), "--resume"], capsys))
    assert re.search(pattern, refused([*argv, "--out", str(tmp_path / "other"), "--init", str(out / "last.pt")], capsys))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert re.search(r"notes\.txt: not a readable", refused([*argv, "--init", str(tmp_path / "notes.txt")], capsys))


# ----------------------------------------------------------------------------- stage 3 on precomputed features
def test_rescale_is_linear_interpolation_between_snippet_centres():
    x = torch.tensor([[0.0, 10.0, 20.0, 40.0]])                                  # (D = 1, T = 4)
    # L = 2: positions (i + 0.5) * 4 / 2 - 0.5 = 0.5, 2.5 -> halfway between inputs 0-1 and 2-3.
    assert torch.allclose(lofi.rescale(x, 2), torch.tensor([[5.0, 30.0]]))
    # L = 8: positions -0.25 (clamped to 0), 0.25, 0.75, 1.25, ..., 3.25 (clamped to 3).
    want = [0.0, 2.5, 7.5, 12.5, 17.5, 25.0, 35.0, 40.0]
    assert torch.allclose(lofi.rescale(x, 8), torch.tensor([want]))
    assert torch.equal(lofi.rescale(x, 4), x)


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
    anno = data.synth(root, videos=64, seed=5)
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


def test_oracle_features_through_stage_3_reach_a_high_map(oracle, tmp_path):
    """The head path (targets, G-TAD training, decoding, class assignment, evaluation) on ground-truth
    features: an encoder-independent ceiling. Measured 0.8-0.9 average mAP; a broken path gives ~0."""
    out = tmp_path / "head"
    lofi.main(["--stage", "head", "--preset", "tiny", "--anno", str(oracle / "anno.json"), "--features",
               str(oracle / "features"), "--out", str(out), "--workers", "0", "--epochs", "8"])
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["average-mAP"] >= 0.7, metrics
    # The head has no encoder: stage detect says so instead of failing inside torch.
    r = subprocess.run([sys.executable, str(ROOT / "lofi.py"), "--stage", "detect", "--run", str(out),
                        "--video", str(next((oracle / "videos").iterdir()))], capture_output=True, text=True)
    assert r.returncode != 0 and "precomputed features" in r.stderr and "Traceback" not in r.stderr


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
               str(oracle / "features"), "--out", str(out), "--workers", "0", "--epochs", "2", "--lr-search"])
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
    args = lofi.get_args(["--stage", "head", *SMALL, *synth, "--out", str(tmp_path / "x")])
    train, _ = lofi.load_split(args, "training")
    pick = np.random.default_rng([args.seed, 11]).permutation(len(train))[:3]
    ds = lofi.tal_dataset(args, [train[i] for i in sorted(pick)])
    means = []
    for i in range(len(ds)):
        frames = ds[i]["frames"].flatten(0, 1)                                   # (L*F, 3, H, W)
        y = torch.nn.functional.conv2d(lofi.tsm.normalize(frames), before["conv1.weight"], stride=2, padding=3)
        means.append(y.mean((0, 2, 3)))
    torch.testing.assert_close(after["bn1.running_mean"], torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)
