"""`lofi.py --stage extract` on this machine: videos/s and bytes a video, dense (every snippet of the decoded
video) and from a frame store (T = --snippets, as stage 3 extracts), synthetic videos, decoding included, one
process, a random TSM-R18 (its weights do not change the cost).

    python tests/bench/bench_extract.py [--videos 16] [--repeats 3] [--paper-videos 2]

Rows: the tiny geometry (4 frames at stride 2, 64^2: train.sh's) dense at feat_stride = num_frames (8, no
overlap) and 2 (4x overlap), and from a store at L = 32; then the paper geometry (8 frames at stride 8,
224^2) dense at 64 and 16 on a few videos. Each command runs `--repeats` times, the rows interleaved (the
machines are shared); the median is reported. Bytes: the files' size on disk, D = 512.
"""
import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
import data  # noqa: E402
import lofi  # noqa: E402
import synthetic  # noqa: E402  (beside this file)

TINY = ["--preset", "tiny", "--frames", "4", "--stride", "2", "--size", "64", "--snippets", "32"]
PAPER = ["--preset", "tiny", "--frames", "8", "--stride", "8", "--size", "224", "--snippets", "100"]


def run(argv, out):
    """One extraction into a fresh folder -> (seconds, mean T, mean bytes of a video's file)."""
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        lofi.main([*argv, "--init", "none", "--workers", "0", "--out", str(out)])
        seconds = time.perf_counter() - t0
    videos = json.loads((out / "features.json").read_text())["videos"]
    return seconds, np.mean([v["T"] for v in videos.values()]), np.mean([
        (out / f"v_{vid}.npy").stat().st_size for vid in videos])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--paper-videos", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, n in (("many", args.videos), ("few", args.paper_videos)):
            synthetic.synth(tmp / name, videos=n, seed=0)
        with contextlib.redirect_stdout(io.StringIO()):
            data.prepare(tmp / "many" / "anno.json", tmp / "many" / "videos", tmp / "store", data.GEOMETRY["tiny"])
        files = lambda name: ["--anno", str(tmp / name / "anno.json"), "--videos", str(tmp / name / "videos")]
        rows = {  # name -> (argv, videos)
            "tiny, dense, feat_stride 8 (= num_frames)": (["--stage", "extract", *TINY, *files("many")], args.videos),
            "tiny, dense, feat_stride 2 (4x overlap)": (["--stage", "extract", *TINY, "--feat-stride", "2",
                                                         *files("many")], args.videos),
            "tiny, store, T = L = 32 (stage 3's)": (["--stage", "extract", *TINY, "--anno", str(tmp / "many" /
                                                    "anno.json"), "--store", str(tmp / "store")], args.videos),
            "paper, dense, feat_stride 64 (= num_frames)": (["--stage", "extract", *PAPER, *files("few")],
                                                            args.paper_videos),
            "paper, dense, feat_stride 16": (["--stage", "extract", *PAPER, "--feat-stride", "16", *files("few")],
                                             args.paper_videos),
        }
        times, shape = {k: [] for k in rows}, {}
        for r in range(args.repeats):
            for i, (k, (argv, _)) in enumerate(rows.items()):
                seconds, *shape[k] = run(argv, tmp / f"out{i}_{r}")
                times[k].append(seconds)
        print("| extraction | videos | T a video (mean) | s / video (median) | videos / s | snippets / s | "
              "bytes / video (mean, float32) |\n" + "|---" * 7 + "|")
        for k, (_, n) in rows.items():
            s, (T, size) = statistics.median(times[k]) / n, shape[k]
            print(f"| {k} | {n} | {T:.1f} | {s:.3f} | {1 / s:.2f} | {T / s:.0f} | {size:,.0f} |")
        print("runs (s): " + "; ".join(f"{k}: " + ", ".join(f"{t:.2f}" for t in v) for k, v in times.items()))


if __name__ == "__main__":
    main()
