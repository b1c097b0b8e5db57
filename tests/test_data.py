"""Tests for data.py: snippet indices against hand cases and an exact-fraction loop, decoding against
a video whose frame k shows k in binary, fidelity sizes and schedules, the batch sampler across epochs
and ranks, bad input, the synthetic dataset (check CLI + motion), and the frame store against a
plain decode followed by the same JPEG round trip."""
import contextlib
import io
import json
import pickle
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from math import floor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import data
from bench import other_synth, synthetic
from data import Fidelity

ROOT = Path(__file__).resolve().parents[1]
TINY = Fidelity(32, 64, 64)
PAPER = Fidelity(100, 224, 224)


def cli(*args):
    """`python data.py ARGS` run in this process (a second interpreter would import torch again, seconds on
    these machines) -> CompletedProcess(returncode, stdout, stderr), as subprocess.run gives."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = data.main([str(a) for a in args])
        except SystemExit as e:                               # parser.error: the one-line refusals
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


# ---------------- snippet indices
def test_snippet_indices_hand_cases():
    # Long video, exactly L windows: snippet i covers frames [8i, 8i + 8), frames at 8i + 1, 3, 5, 7.
    np.testing.assert_array_equal(data.snippet_indices(256, 32, F=4, stride=2), 8 * np.arange(32)[:, None] + [1, 3, 5, 7])
    # Paper: 64-frame windows at stride 8 -> offsets 4, 12, ..., 60 inside each window.
    idx = data.snippet_indices(6400, 100, F=8, stride=8)
    assert idx.dtype == np.int64 and idx.shape == (100, 8)
    np.testing.assert_array_equal(idx[[0, 99]], [np.arange(4, 64, 8), 6336 + np.arange(4, 64, 8)])
    # Short video: centres 1.25, 3.75, 6.25, 8.75, offsets -3, -1, 1, 3, floored and clipped to [0, 9].
    np.testing.assert_array_equal(data.snippet_indices(10, 4, F=4, stride=2),
                                  [[0, 0, 2, 4], [0, 2, 4, 6], [3, 5, 7, 9], [5, 7, 9, 9]])
    np.testing.assert_array_equal(data.snippet_indices(1, 5, F=3, stride=4), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        data.snippet_indices(0, 5)


def test_snippet_indices_match_exact_fraction_loop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, L, F, s = (int(x) for x in rng.integers([1, 1, 1, 1], [5000, 120, 9, 9]))
        centre = [Fraction(2 * i + 1, 2) * Fraction(n, L) for i in range(L)]            # exact rationals
        offset = [s * Fraction(2 * f + 1, 2) - Fraction(F * s, 2) for f in range(F)]
        ref = [[min(max(floor(c + o), 0), n - 1) for o in offset] for c in centre]
        np.testing.assert_array_equal(data.snippet_indices(n, L, F, s), ref)


def test_clip_indices():
    # Instance [100, 200), window 8 frames at stride 2: centred -> 147, 149, 151, 153; u = 0 / 1 -> the ends.
    np.testing.assert_array_equal(data.clip_indices(100, 200, 0.5, 4, 2), [147, 149, 151, 153])
    np.testing.assert_array_equal(data.clip_indices(100, 200, 0.0, 4, 2), [101, 103, 105, 107])
    np.testing.assert_array_equal(data.clip_indices(100, 200, 1.0, 4, 2), [193, 195, 197, 199])
    # A 3-frame instance shorter than the window repeats its frames.
    np.testing.assert_array_equal(data.clip_indices(10, 13, 0.9, 4, 2), [10, 10, 12, 12])


# ---------------- fidelity and schedules
def test_fidelity_sizes():
    assert data.c_lofi(PAPER) == [Fidelity(100, 112, 112), Fidelity(25, 224, 224), Fidelity(50, 158, 158)]
    assert data.c_lofi(TINY) == [Fidelity(32, 32, 32), Fidelity(8, 64, 64), Fidelity(16, 46, 46)]
    assert [str(f) for f in [PAPER, *data.c_lofi(PAPER)]] == ["100x224x224", "100x112x112", "25x224x224", "50x158x158"]
    # Sec. 3.2: per-video cost L * H * W stays within ~25 % of S-LoFi's across the grid.
    cost = [f.L * f.H * f.W for f in data.c_lofi(PAPER)]
    assert max(cost) / min(cost) < 1.25


def test_long_and_short_cycles():
    S, T, ST = data.c_lofi(TINY)
    assert [data.fidelity_at([S, T, ST], "long", e, 999) for e in range(7)] == [S, T, ST, S, T, ST, S]
    assert [data.fidelity_at([S, T, ST], "long", e, 0, c_l=2) for e in range(7)] == [S, S, T, T, ST, ST, S]
    short = [data.fidelity_at([S, T, ST], "short", 5, s, c_s=16) for s in range(100)]
    assert short == ([S] * 16 + [T] * 16 + [ST] * 16) * 2 + [S] * 4
    assert data.fidelity_at([TINY], "short", 3, 77) == TINY
    with pytest.raises(ValueError):
        data.fidelity_at([S], "medium", 0, 0)


# ---------------- batch sampler
def run_sampler(epoch, **kw):
    s = data.Batches(**kw)
    s.set_epoch(epoch)
    return list(s), len(s)


def test_sampler_across_ranks_and_epochs():
    S, T, ST = configs = data.c_lofi(TINY)
    kw = dict(n=37, per_rank=3, configs=configs, cycle="short", c_s=4, world=2, seed=5)
    # 37 // 6 = 6 steps an epoch; the short cycle counts global steps: epoch 1 runs steps 6..11.
    expected = {0: [S, S, S, S, T, T], 1: [T, T, ST, ST, ST, ST], 2: [S] * 4 + [T] * 2}
    orders = []
    for epoch in range(3):
        (b0, n0), (b1, n1) = run_sampler(epoch, rank=0, **kw), run_sampler(epoch, rank=1, **kw)
        assert n0 == n1 == len(b0) == len(b1) == 6
        for x, y in zip(b0, b1):
            assert len(x) == len(y) == 3 and len({f for _, f in x + y}) == 1 and x[0][1] == y[0][1]
        assert [b[0][1] for b in b0] == expected[epoch]
        seen = [i for b in b0 + b1 for i, _ in b]
        assert len(set(seen)) == len(seen) == 36                      # disjoint across ranks and steps
        # One rank with the global batch sees exactly the union of the two ranks' batches.
        single, _ = run_sampler(epoch, **{**kw, "world": 1, "per_rank": 6})
        assert [sorted(i for i, _ in b) for b in single] == [sorted(i for i, _ in x + y) for x, y in zip(b0, b1)]
        assert run_sampler(epoch, rank=0, **kw)[0] == b0                # reproducible
        orders.append(seen)
    assert orders[0] != orders[1]
    long, _ = run_sampler(4, rank=1, **{**kw, "cycle": "long"})
    assert {f for b in long for _, f in b} == {T}
    # A resumed epoch skips the steps already run, and continues with the same batches.
    s = data.Batches(**kw, rank=1)
    s.set_epoch(1, start_step=4)
    assert len(s) == 2 and list(s) == run_sampler(1, rank=1, **kw)[0][4:]


def test_sampler_in_order_strides_ranks_without_padding():
    kw = dict(n=7, per_rank=2, world=2, train=False)
    (b0, n0), (b1, n1) = run_sampler(0, rank=0, **kw), run_sampler(0, rank=1, **kw)
    assert n0 == n1 == 2
    assert b0 == [[0, 2], [4, 6]] and b1 == [[1, 3], [5]]             # every item once, no repeat
    assert run_sampler(0, rank=0, **{**kw, "world": 1})[0] == [[0, 1], [2, 3], [4, 5], [6]]
    with pytest.raises(ValueError, match="cannot fill one batch"):
        data.Batches(5, 3, world=2)                                   # training: not one global batch


# ---------------- decoding
def write_counter_video(path, n, fourcc="mp4v", fps=10):
    """Frame k shows k in binary: 7 bit blocks (white = 1) and one red block, in the centre 64 x 64
    of a 96 x 64 frame; the 16-pixel side bands (grey) must be cropped away."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (96, 64))
    for k in range(n):
        frame = np.full((64, 96, 3), 128, np.uint8)
        for b in range(8):
            y, x = 32 * (b // 4), 16 + 16 * (b % 4)
            frame[y:y + 32, x:x + 16] = (0, 0, 255) if b == 7 else 255 * ((k >> b) & 1)   # BGR red
        writer.write(frame)
    writer.release()


def read_counter(frames):
    """(..., 3, 32, 32) RGB frames decoded at 32 x 32 -> the number each shows (block = 8 x 16)."""
    cells = np.asarray(frames).reshape(*frames.shape[:-3], 3, 2, 16, 4, 8).mean((-3, -1))    # (..., 3, 2, 4)
    assert (cells[..., 0, 1, 3] > 200).all() and (cells[..., 2, 1, 3] < 60).all()             # red in RGB order
    bits = (cells.reshape(*frames.shape[:-3], 3, 8)[..., :7].mean(-2) > 128).astype(int)      # (..., 7)
    return (bits << np.arange(7)).sum(-1)


def test_decoded_frames_are_the_frames_at_the_indices(tmp_path):
    path = tmp_path / "counter.mp4"
    write_counter_video(path, 90)
    frames, n, fps = data.read_video(path, lambda n, fps: data.snippet_indices(n, 7, F=3, stride=4), (32, 32))
    assert (n, fps) == (90, 10) and frames.shape == (7, 3, 3, 32, 32) and frames.dtype == np.uint8
    np.testing.assert_array_equal(read_counter(frames), data.snippet_indices(90, 7, F=3, stride=4))
    clip, n, fps = data.read_video(path, lambda n, fps: data.snippet_indices(n, 5, 2, 3), (32, 32))
    assert clip.shape == (5, 2, 3, 32, 32) and n / fps == 9.0
    np.testing.assert_array_equal(read_counter(clip), data.snippet_indices(90, 5, 2, 3))


@pytest.mark.parametrize("fourcc, ext", [("mp4v", "mp4"), ("MJPG", "avi")])
def test_seeking_reads_the_same_frames_as_decoding_from_the_start(tmp_path, monkeypatch, fourcc, ext):
    path = tmp_path / f"counter.{ext}"
    write_counter_video(path, 120, fourcc=fourcc)
    for first in (0, 1, 37, 100, 116):
        index_fn = lambda n, fps: data.clip_indices(first, n, 0.0, 2, 2)                # frames first .. first + 3
        sought, n, _ = data.read_video(path, index_fn, (32, 32), seek_first=True)
        np.testing.assert_array_equal(read_counter(sought), index_fn(120, 10))
        assert np.array_equal(sought, data.read_video(path, index_fn, (32, 32))[0]) and n == 120
    class Missing:                                      # a capture whose seeks land elsewhere (not a subclass:
        def __init__(self, *args, real=cv2.VideoCapture):  # OpenCV's types crash when subclassed objects die)
            self.cap = real(*args)

        def __getattr__(self, name):
            return getattr(self.cap, name)

        def get(self, prop):
            return -1.0 if prop == cv2.CAP_PROP_POS_MSEC else self.cap.get(prop)
    monkeypatch.setattr(data.cv2, "VideoCapture", Missing)
    frames, _, _ = data.read_video(path, lambda n, fps: [100, 102], (32, 32), seek_first=True)
    np.testing.assert_array_equal(read_counter(frames), [100, 102])                      # read from frame 0


def test_container_over_reporting(tmp_path):
    """A truncated MJPG .avi keeps its header's frame count: slightly short -> indices recomputed from
    the true count; far short -> an error naming the file."""
    whole = tmp_path / "whole.avi"
    write_counter_video(whole, 100, fourcc="MJPG")
    blob = whole.read_bytes()
    short, broken = tmp_path / "short.avi", tmp_path / "broken.avi"
    short.write_bytes(blob[:int(len(blob) * 0.92)])
    broken.write_bytes(blob[:len(blob) // 2])
    _, stated, _ = data.open_video(short)
    cap, true = cv2.VideoCapture(str(short)), 0
    while cap.grab():
        true += 1
    assert stated == 100 and 90 <= true < 100
    frames, n, _ = data.read_video(short, lambda n, fps: data.snippet_indices(n, 10, 2, 4), (32, 32))
    assert n == true
    np.testing.assert_array_equal(read_counter(frames), data.snippet_indices(true, 10, 2, 4))
    with pytest.raises(data.VideoError, match="broken.avi.*stream ends"):
        data.read_video(broken, lambda n, fps: data.snippet_indices(n, 10, 2, 4), (32, 32))


def test_deep_check_counts_every_frame_in_parallel(tmp_path):
    """check --deep finds a cut MJPG .avi that still opens and states its full count (the quick check
    passes it), with the true count a naive read loop gives, the same with 1 and 2 processes."""
    videos_dir = tmp_path / "videos"
    videos_dir.mkdir()
    write_counter_video(videos_dir / "whole.avi", 100, fourcc="MJPG")
    blob = (videos_dir / "whole.avi").read_bytes()
    (videos_dir / "cut.avi").write_bytes(blob[:len(blob) // 2])
    (videos_dir / "empty.avi").write_bytes(b"")
    anno = tmp_path / "anno.json"
    anno.write_text(json.dumps({"database": {vid: {"subset": "training", "duration": 10.0, "annotations": [
        {"segment": [1.0, 4.0], "label": "a"}]} for vid in ("whole", "cut", "empty", "gone")}}))
    videos, _ = data.read_annotations(anno)
    cap, true = cv2.VideoCapture(str(videos_dir / "cut.avi")), 0
    while cap.read()[0]:
        true += 1
    assert 30 < true < 70
    quick, _ = data.check(videos.values(), videos_dir)
    assert sorted(e.split(":")[0] for e in quick) == ["empty", "gone"]
    deep = [data.check(videos.values(), videos_dir, deep=True, workers=w)[0] for w in (1, 2)]
    assert deep[0] == deep[1] and len(deep[0]) == 4                 # cut: its count, and so its duration
    assert any(e.startswith("cut:") and f"{true} frames decode, the container states 100" in e for e in deep[0])
    result = cli("check", "--anno", anno, "--videos", videos_dir, "--deep", "--workers", "1")
    assert result.returncode == 1 and "4 errors" in result.stdout


def test_bad_files_and_annotations(tmp_path):
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(data.VideoError, match="garbage.mp4.*cannot open"):
        data.read_video(tmp_path / "garbage.mp4", lambda n, fps: [0], (32, 32))
    cv2.VideoWriter(str(tmp_path / "empty.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64)).release()
    with pytest.raises(data.VideoError, match="empty.avi: the container states 0 frames"):
        data.read_video(tmp_path / "empty.avi", lambda n, fps: [0], (32, 32))
    # One listing finds <id>.<ext> before v_<id>.<ext>, in EXTENSIONS order, and keeps ids that start with v_.
    for name in ("v_prefixed.webm", "both.avi", "both.mp4", "v_both.mp4", "v_v_UmAH95xls.mkv", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    files = {vid: path.name for vid, path in data.video_files(tmp_path).items()}
    assert files["prefixed"] == "v_prefixed.webm" and files["both"] == "both.mp4" and "nothere" not in files
    assert files["v_UmAH95xls"] == "v_v_UmAH95xls.mkv" and not any(name == "notes.txt" for name in files.values())

    bad = tmp_path / "bad.json"
    for text, pattern in [("{not json", "bad.json: not valid JSON"), ('{"videos": {}}', "bad.json: no 'database'"),
                          ('{"database": {"abc": {"duration": 5, "annotations": [{"segment": ["x", 2], "label": "a"}]}}}',
                           "bad.json: video abc: malformed"),
                          ('{"database": {"abc": {"annotations": []}}}', "bad.json: video abc: malformed"),
                          ('{"database": {"abc": [1, 2]}}', "bad.json: video abc: malformed")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=pattern):
            data.read_annotations(bad)


def test_read_annotations_hand_case(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"database": {
        "v_abcdefghijk": {"subset": "training", "duration": 10.0, "annotations": [
            {"segment": [-1.0, 3.0], "label": "b"}, {"segment": [4.0, 12.0], "label": "a"},
            {"segment": [11.0, 13.0], "label": "a"}, {"segment": [5.0, 5.0], "label": "a"},
            {"segment": [2, 6], "label": "c"}]},
        "xyz": {"subset": "validation", "duration": 4.0, "annotations": []}}}))
    videos, report = data.read_annotations(path)
    v = videos["abcdefghijk"]
    np.testing.assert_array_equal(v.segments, [[0, 3], [4, 10], [2, 6]])
    assert v.labels == ["b", "a", "c"] and v.segments.dtype == np.float64
    assert (report["videos"], report["segments"], report["clipped"], report["dropped"]) == (2, 3, 2, 2)
    assert data.class_names(videos) == ["a", "b", "c"]
    assert list(data.read_annotations(path, "validation")[0]) == ["xyz"]


def test_read_real_activitynet(anet_annotations):
    videos, report = data.read_annotations(anet_annotations)
    # 215 segments run past the stated duration; 12 are empty ([0, 0], [t, t]): 227 in all.
    assert (report["videos"], report["clipped"], report["dropped"]) == (14377, 215, 12)
    assert report["segments"] == 22152 - 12 and len(report["problems"]) == 227
    assert "v_UmAH95xls" in videos and "UmAH95xls" not in videos
    for v in videos.values():
        assert (v.segments[:, 0] >= 0).all() and (v.segments[:, 1] <= v.duration).all()
        assert (v.segments[:, 1] > v.segments[:, 0]).all() and len(v.labels) == len(v.segments)
    assert len(data.read_annotations(anet_annotations, "validation")[0]) == 4728
    assert len(data.class_names(videos)) == 200


# ---------------- synthetic dataset
@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert cli("synth", out, "--videos", 6, "--seed", 3).returncode == 0
    return out


def test_synth_passes_check_and_check_finds_problems(synth_set, tmp_path):
    result = cli("check", "--anno", synth_set / "anno.json", "--videos", synth_set / "videos", "--deep", "--workers", 1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 videos" in result.stdout and "0 errors" in result.stdout
    anno = json.loads((synth_set / "anno.json").read_text())
    assert {e["subset"] for e in anno["database"].values()} == {"training", "validation"}
    # Break a copy: one file missing, one garbage, one duration off, one empty label.
    videos = tmp_path / "videos"
    videos.mkdir()
    ids = sorted(anno["database"])
    for vid in ids[2:]:
        (videos / f"{vid}.mp4").write_bytes((synth_set / "videos" / f"{vid}.mp4").read_bytes())
    (videos / f"{ids[1]}.mp4").write_bytes(b"not a video")
    anno["database"][ids[2]]["duration"] += 5.0
    anno["database"][ids[3]]["annotations"][0]["label"] = ""
    (tmp_path / "anno.json").write_text(json.dumps(anno))
    result = cli("check", "--anno", tmp_path / "anno.json", "--videos", videos, "--workers", 1)
    assert result.returncode == 1
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 4 and "4 errors" in result.stdout
    for vid, what in zip(ids, ["no video file", "cannot open", "annotated", "empty label"]):
        assert any(vid in line and what in line for line in errors), (vid, what, errors)


def test_synth_is_a_function_of_the_seed(synth_set, tmp_path):
    synthetic.synth(tmp_path / "same", videos=2, seed=3)
    synthetic.synth(tmp_path / "other", videos=2, seed=4)
    for vid in ["synth_0000", "synth_0001"]:
        assert (tmp_path / "same/videos" / f"{vid}.mp4").read_bytes() == (synth_set / "videos" / f"{vid}.mp4").read_bytes()
        assert (tmp_path / "other/videos" / f"{vid}.mp4").read_bytes() != (synth_set / "videos" / f"{vid}.mp4").read_bytes()
    first_two = {k: v for k, v in json.loads((synth_set / "anno.json").read_text())["database"].items() if k < "synth_0002"}
    assert json.loads((tmp_path / "same/anno.json").read_text())["database"] == first_two


def test_synth_at_another_frame_rate_lasts_as_long(tmp_path):
    videos, _ = data.read_annotations(synthetic.synth(tmp_path, videos=4, seed=0, fps=30))
    assert all(15 <= v.duration <= 30 for v in videos.values())
    assert data.check(videos.values(), tmp_path / "videos") == ([], [])


def test_synth_actions_show_only_in_motion(synth_set):
    anno = json.loads((synth_set / "anno.json").read_text())["database"]
    videos, _ = data.read_annotations(synth_set / "anno.json")
    assert set(data.class_names(videos)) <= set(synthetic.SYNTH_CLASSES)
    kinds = set()
    for v in videos.values():
        frames, n, fps = data.read_video(synth_set / "videos" / f"{v.id}.mp4", lambda n, fps: np.arange(n), (64, 64))
        assert abs(n / fps - v.duration) < 1e-6 and 1 <= len(v.segments) <= 3 and len(set(v.labels)) == 1
        moving = (np.abs(np.diff(frames.astype(int), axis=0)).max(1) > 40).mean((1, 2))    # (n - 1,)
        inside, distracted = np.zeros(n, bool), np.zeros(n, bool)
        for s, e in np.round(v.segments * fps).astype(int):
            inside[s:e] = True
        for d in anno[v.id]["distractors"]:
            s, e = np.round(np.array(d["segment"]) * fps).astype(int)
            distracted[s:e] = True
            kinds.add(d["kind"])
        assert not (inside & distracted).any()           # distractors lie between instances
        # Outside actions and distractors nothing but noise changes; during an action the object moves.
        still = ~(inside | distracted)
        assert moving[still[1:] & still[:-1]].max() < 0.002
        assert moving[inside[1:] & inside[:-1]].mean() > 0.01
    assert kinds <= {"shake", "slide"}


# ---------------- datasets
def naive_frames(path, size):
    """Every frame of a video by a plain read loop, fitted to H x W -> list of BGR (H, W, 3)."""
    cap = cv2.VideoCapture(str(path))
    frames = [data.fit_frame(f, size) for ok, f in iter(cap.read, (False, None))]
    cap.release()
    return frames


def _track(frames):
    """Frames (n, 3, H, W) -> the object's centre (n, 2) (y, x) and spread (n,), from its sharp edges (a checkered
    texture, on a smooth background)."""
    f = frames.astype(np.float64)
    edges = (np.abs(np.diff(f, axis=2))[..., :-1] + np.abs(np.diff(f, axis=3))[..., :-1, :]).max(1) > 60
    yx = [np.argwhere(e).astype(np.float64) for e in edges]                        # n x (K, 2)
    return np.array([p.mean(0) for p in yx]), np.array([np.sqrt(((p - p.mean(0)) ** 2).sum(1).mean()) for p in yx])


def test_kinetics_clips_move_as_their_class_and_look_like_any(tmp_path):
    # Neither target set's classes (synth's, tests/bench/other_synth.py's) is a pre-training class.
    videos, _ = data.read_annotations(synthetic.synth_kinetics(tmp_path, clips=72, seed=1))
    assert not set(data.class_names(videos)) & {*synthetic.SYNTH_CLASSES, *other_synth.CLASSES}
    assert set(data.class_names(videos)) == set(synthetic.KINETICS_CLASSES)
    assert data.check(videos.values(), tmp_path / "videos") == ([], [])
    looks, labels, moves = [], [], {}
    for v in videos.values():
        frames, n, fps = data.read_video(tmp_path / "videos" / f"{v.id}.mp4", lambda n, fps: np.arange(n), (64, 80))
        assert abs(n / fps - v.duration) < 1e-6 and 1 <= v.duration <= 1.6 and v.segments.tolist() == [[0, v.duration]]
        centre, spread = _track(frames)
        (dy, dx), (py, px) = centre[-3:].mean(0) - centre[:3].mean(0), np.ptp(centre, 0)    # net and range moved
        grew, label = spread[-3:].mean() / spread[:3].mean(), v.labels[0]
        moves.setdefault(label, []).append((dy, abs(dx), py, px, grew))
        middle = frames[n // 2].reshape(3, -1).astype(np.float64)
        looks.append(np.r_[middle.mean(1), middle.std(1), spread[n // 2]])
        labels.append(label)
    # A drift goes one way (a target swings back and forth), a figure eight goes back, the rest stay in place:
    # per class, the median clip's net move dy, |dx|, range moved (y, x) and size end / start.
    m = {label: np.median(np.array(rows), 0) for label, rows in moves.items()}
    for label, (dy, dx, py, px, grew) in m.items():
        assert {"sideways": dx > 6 > 2 > abs(dy) and dx > 0.6 * px, "rise": -dy > 6 > 2 > dx and -dy > 0.6 * py,
                "fall": dy > 6 > 2 > dx and dy > 0.6 * py, "slant": dx > 3 and dx > 0.6 * px and py > 6,
                "spin": max(abs(dy), dx) < 2 and 0.9 < grew < 1.1, "rock": max(abs(dy), dx) < 2 and 0.9 < grew < 1.1,
                "grow": max(abs(dy), dx) < 2 and grew > 1.5, "shrink": max(abs(dy), dx) < 2 and grew < 0.7,
                "figure8": px > dx + 3 and py > 3}[label], (label, m[label])
    # The look (colours, contrast, size in the middle frame) predicts the class no better than chance: nearest
    # class mean, fitted on two thirds, tested on the rest.
    looks, labels = (looks - np.mean(looks, 0)) / np.std(looks, 0), np.array(labels)
    fit = np.arange(len(labels)) // len(synthetic.KINETICS_CLASSES) % 3 != 0   # (classes in turn)
    names = sorted(set(labels))
    means = np.stack([looks[fit & (labels == c)].mean(0) for c in names])
    guess = np.array(names)[((looks[~fit, None] - means) ** 2).sum(-1).argmin(1)]
    assert (guess == labels[~fit]).mean() < 2.5 / len(names)


def jpeg_round_trip(bgr, size):
    """The store's promise, written out: JPEG at quality 90, decoded at the largest libjpeg reduction
    that keeps H x W or more, then one bilinear resize if the size still differs -> (3, H, W) RGB."""
    blob = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
    side = bgr.shape[0]
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}[
        4 if side // 4 >= size[0] else 2 if side // 2 >= size[0] else 1]
    img = cv2.imdecode(blob, flag)
    if img.shape[:2] != size:
        img = cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR)
    return img[:, :, ::-1].transpose(2, 0, 1)


@pytest.fixture(scope="module")
def store(synth_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("store") / "s"
    result = cli("prepare", "--anno", synth_set / "anno.json", "--videos", synth_set / "videos", "--store", root,
                 "--preset", "tiny", "--workers", "2")
    assert result.returncode == 0, result.stderr
    return root, result.stdout


def test_store_frames_equal_a_decode_and_the_same_jpeg_round_trip(synth_set, store):
    root, said = store
    videos, _ = data.read_annotations(synth_set / "anno.json")
    files = data.video_files(synth_set / "videos")
    ds = data.TALDataset(videos, data.FrameStore(root), 4, 2, full=TINY)
    assert said.strip().splitlines()[-1] == (f"prepared 6 videos (0 failed, 0 missing): {ds.store.config and sum(r['stored'] for r in ds.store.records.values())} frames, "
                                             f"{sum((root / f'{v}.jpg').stat().st_size for v in videos)} bytes -> {root}")
    for i, v in enumerate(ds.videos[:3]):
        raw = naive_frames(files[v.id], (64, 64))
        for fid in [TINY, *data.c_lofi(TINY)]:                            # 32x64^2, 32x32^2, 8x64^2, 16x46^2
            got = ds[(i, fid)]["frames"].numpy()                                            # (L, F, 3, H, W)
            idx = data.snippet_indices(len(raw), fid.L, 4, 2)
            want = np.stack([[jpeg_round_trip(raw[t], (fid.H, fid.W)) for t in row] for row in idx])
            assert got.shape == want.shape and np.array_equal(got, want), (v.id, fid)
    # The record: frame count and fps as decoded, the frames and bytes stored.
    r = ds.store.records[ds.videos[0].id]
    assert r["frames"] == len(naive_frames(files[ds.videos[0].id], (8, 8))) and r["fps"] == 10 and r["error"] is None
    assert r["bytes"] == (root / f"{ds.videos[0].id}.jpg").stat().st_size
    assert r["stored"] == len(np.load(root / f"{ds.videos[0].id}.idx.npy")) > 0


def test_store_clips_are_the_file_clips_after_the_same_jpeg_round_trip(synth_set, store):
    """Stage 1 draws the same clips from a store as from the files: a training instance is stored whole."""
    videos, _ = data.read_annotations(synth_set / "anno.json")
    classes = data.class_names(videos)
    files = data.video_files(synth_set / "videos")
    for train in (True, False):
        kw = dict(classes=classes, F=4, stride=2, size=(64, 64), augment=False, train=train, seed=5)
        stored = data.ClipDataset(videos, data.FrameStore(store[0]), **kw)
        for k, (i, j) in enumerate(stored.items):
            v = stored.videos[i]
            frames = naive_frames(files[v.id], (64, 64))
            u = np.random.default_rng([5, 0, k]).random() if train else 0.5           # the dataset's draw
            idx = data.clip_indices(*data.instance_frames(v.segments[j], len(frames), 10), u, 4, 2)
            want = np.stack([jpeg_round_trip(frames[t], (64, 64)) for t in idx])
            assert np.array_equal(stored[k]["frames"].numpy(), want), (v.id, j, u)
            if not train:
                break
    # Training videos keep whole instances; the others only the centred windows besides the snippets.
    root = store[0]
    for v in videos.values():
        n, kept = data.FrameStore(root).records[v.id]["frames"], set(np.load(root / f"{v.id}.idx.npy")[:, 0].tolist())
        inside = {t for s in v.segments for t in range(*data.instance_frames(s, n, 10))}
        assert (inside <= kept) == (v.subset == "training"), v.id


def test_prepare_resumes_after_a_kill(synth_set, store, tmp_path):
    """SIGKILL a one-process prepare once two videos are in the manifest: the rerun decodes only the rest
    and ends with the files and records of the uninterrupted store."""
    root, _ = store
    argv = [sys.executable, str(ROOT / "data.py"), "prepare", "--anno", str(synth_set / "anno.json"), "--videos",
            str(synth_set / "videos"), "--store", str(tmp_path / "s"), "--preset", "tiny", "--workers", "1"]
    run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "s" / "manifest.jsonl"
    while run.poll() is None and not (manifest.exists() and len(manifest.read_text().splitlines()) >= 2):
        time.sleep(0.005)
    run.kill()
    run.wait()
    done = len(manifest.read_text().splitlines())
    assert 2 <= done < 6, "prepare finished before the kill: make the set larger"
    again = cli(*argv[2:])
    assert again.returncode == 0, again.stderr
    assert f"{done} videos already in" in again.stdout and f"; {6 - done} to decode" in again.stdout
    one, two = data.FrameStore(root), data.FrameStore(tmp_path / "s")
    assert one.records == two.records
    for vid in one.records:
        assert (root / f"{vid}.jpg").read_bytes() == (tmp_path / "s" / f"{vid}.jpg").read_bytes()
        assert np.array_equal(np.load(root / f"{vid}.idx.npy"), np.load(tmp_path / "s" / f"{vid}.idx.npy"))
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_store_refuses_other_settings_and_bad_frames(synth_set, store, tmp_path):
    root, _ = store
    result = cli("prepare", "--anno", synth_set / "anno.json", "--videos", synth_set / "videos", "--store", root,
                 "--preset", "paper")
    assert result.returncode == 2 and "prepared with other settings" in result.stderr, result.stderr
    assert "not a frame store" in cli("prepare", "--anno", synth_set / "anno.json", "--videos", synth_set / "videos",
                                      "--store", synth_set / "anno.json").stderr
    # A store file damaged after prepare: the video is a VideoError (replaced in training), named.
    copy = tmp_path / "s"
    shutil.copytree(root, copy)
    videos, _ = data.read_annotations(synth_set / "anno.json")
    vid = sorted(videos)[0]
    (copy / f"{vid}.jpg").write_bytes(b"\0" * (copy / f"{vid}.jpg").stat().st_size)
    ds = data.TALDataset([videos[vid]], data.FrameStore(copy), 4, 2, full=TINY)
    with pytest.raises(data.VideoError, match=rf"{vid}.jpg: frame \d+ does not decode"):
        ds._item(0, TINY)
    (copy / f"{vid}.jpg").write_bytes(b"")                                # cut to nothing: no cv2.error escapes
    with pytest.raises(data.VideoError, match=rf"{vid}.jpg: frame \d+ does not decode \(the file ends"):
        ds._item(0, TINY)
    # A store path under a file, a damaged store.json: one line, exit code 2.
    for store_arg in (synth_set / "anno.json" / "x", copy):
        if store_arg == copy:
            (copy / "store.json").write_text("{")
        result = cli("prepare", "--anno", synth_set / "anno.json", "--videos", synth_set / "videos", "--store", store_arg,
                     "--preset", "tiny")
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert str(store_arg) in result.stderr


def test_a_manifest_line_cut_by_a_kill_costs_one_video_again(synth_set, store, tmp_path):
    root, said = store
    copy = tmp_path / "s"
    shutil.copytree(root, copy)
    lines = (copy / "manifest.jsonl").read_text().splitlines()
    cut = json.loads(lines[-1])["id"]
    (copy / "manifest.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])   # killed mid-write
    again = cli("prepare", "--anno", synth_set / "anno.json", "--videos", synth_set / "videos", "--store", copy,
                "--preset", "tiny", "--workers", "1")
    assert again.returncode == 0 and "; 1 to decode" in again.stdout, again.stdout + again.stderr
    assert again.stdout.splitlines()[-1].startswith("prepared 6 videos (0 failed, 0 missing)")
    assert data.FrameStore(copy).records == data.FrameStore(root).records and cut in data.FrameStore(copy).ready


def test_tal_items_and_two_worker_loader(synth_set):
    videos, _ = data.read_annotations(synth_set / "anno.json")
    ds = data.TALDataset(videos, synth_set / "videos", 4, 2, full=TINY)
    item = ds[0]
    v = ds.videos[0]
    np.testing.assert_allclose(item["segments"].numpy(), v.segments / v.duration, rtol=1e-6)
    assert item["labels"] == v.labels and item["fidelity"] == TINY
    # ST-LoFi frames are the same snippets at full resolution, shrunk by INTER_AREA (reference: HWC resize;
    # 64 -> 46 because at an exact halving INTER_LINEAR would give the same numbers).
    ST = data.st_lofi(TINY)
    full = ds[(0, Fidelity(ST.L, 64, 64))]["frames"].permute(0, 1, 3, 4, 2).reshape(-1, 64, 64, 3).numpy()
    ref = np.stack([cv2.resize(f, (ST.W, ST.H), interpolation=cv2.INTER_AREA) for f in full])
    np.testing.assert_array_equal(ds[(0, ST)]["frames"].permute(0, 1, 3, 4, 2).reshape(-1, 46, 46, 3).numpy(), ref)
    pickle.loads(pickle.dumps(ds))
    sampler = data.Batches(len(ds), 2, seed=1, configs=data.c_lofi(TINY), cycle="short", c_s=1)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=data.collate)
    batches = list(loader)
    assert len(batches) == len(ds) // 2 and [b["fidelity"] for b in batches[:3]] == data.c_lofi(TINY)
    for b, idx in zip(batches, sampler):
        f = b["fidelity"]
        assert b["frames"].shape == (2, f.L, 4, 3, f.H, f.W) and b["durations"].dtype == torch.float64
        assert b["ids"] == [ds.videos[i].id for i, _ in idx]
        assert torch.equal(b["frames"][1], ds[idx[1]]["frames"])


def test_broken_videos_are_replaced_by_the_next_with_a_record(synth_set, tmp_path):
    videos, _ = data.read_annotations(synth_set / "anno.json")
    ids = sorted(videos)
    for vid in ids:
        (tmp_path / f"{vid}.mp4").write_bytes((synth_set / "videos" / f"{vid}.mp4").read_bytes())
    (tmp_path / f"{ids[0]}.mp4").write_bytes(b"\0" * 1000)                              # garbage
    whole = (tmp_path / f"{ids[1]}.mp4").read_bytes()
    (tmp_path / f"{ids[1]}.mp4").write_bytes(whole[:len(whole) // 2])                  # a cut download
    ds = data.TALDataset([videos[i] for i in ids], tmp_path, 4, 2, full=TINY)
    first, second = ds[0], ds[1]
    assert first["id"] == second["id"] == ids[2]
    assert [r["id"] for r in first["replaced"]] == ids[:2] and [r["id"] for r in second["replaced"]] == ids[1:2]
    assert all(r["by"] == ids[2] and r["id"] in r["reason"] for r in first["replaced"])
    frames = torch.from_numpy(data.read_video(tmp_path / f"{ids[2]}.mp4", lambda n, fps: data.snippet_indices(
        n, TINY.L, 4, 2), (TINY.H, TINY.W))[0])                                          # the replacement, directly
    assert torch.equal(first["frames"], frames) and torch.equal(ds[2]["frames"], frames) and ds[2]["replaced"] == []
    torch.testing.assert_close(first["segments"], data.normalised_segments(videos[ids[2]]))
    batch = data.collate([ds[1], ds[3]])
    assert [r["id"] for r in batch["replaced"]] == [ids[1]]
    # A clip of a broken video: the next clip that decodes, with the record.
    train = [videos[i] for i in ids]
    clips = data.ClipDataset(train, tmp_path, data.class_names(train), 4, 2, size=(32, 32), train=False)
    clip = clips[0]
    assert {r["id"] for r in clip["replaced"]} == set(ids[:2]) and clip["frames"].shape == (4, 3, 32, 32)
    (tmp_path / f"{ids[3]}.mp4").unlink()                                                 # missing: refused up front
    with pytest.raises(data.BadInput, match=f"{ids[3]}: no video file"):
        data.TALDataset([videos[i] for i in ids], tmp_path, 4, 2, full=TINY)


def test_clip_dataset(synth_set):
    videos, _ = data.read_annotations(synth_set / "anno.json")
    classes = data.class_names(videos)
    train = data.ClipDataset(videos, synth_set / "videos", classes, 4, 2, size=(32, 32), train=True, seed=0)
    assert len(train) == sum(len(v.segments) for v in videos.values())
    frames, label, replaced = (train[0][k] for k in ("frames", "label", "replaced"))
    assert frames.shape == (4, 3, 32, 32) and frames.dtype == torch.uint8 and replaced == []
    batch = data.collate([train[0], train[1]])
    assert batch["frames"].shape == (2, 4, 3, 32, 32) and batch["labels"].tolist() == [label, train[1]["label"]]
    assert batch["replaced"] == [] and batch["ids"] == [train[0]["id"], train[1]["id"]]
    assert classes[label] == train.videos[train.items[0][0]].labels[train.items[0][1]]
    draws = []
    for epoch in (0, 0, 1):
        train.epoch = epoch
        draws.append(torch.stack([train[k]["frames"] for k in range(len(train))]))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    val = data.ClipDataset(videos, synth_set / "videos", classes, 4, 2, size=(32, 32), train=False)
    val.epoch = 3
    first = val[0]["frames"]
    val.epoch = 0
    assert torch.equal(first, val[0]["frames"])
    with pytest.raises(ValueError, match="not a training class"):
        data.ClipDataset(videos, synth_set / "videos", classes[:1], 4, 2)
