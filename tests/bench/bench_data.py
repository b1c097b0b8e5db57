"""Benchmark for data.py (issues 5, 11): training-loader throughput vs raw sequential OpenCV decoding of
the same videos, from the video files and from a frame store (`data.prepare`). Every figure comes from
one run, measured side by side (interleaved repeats, median), so machine noise hits all rows alike.

    python tests/bench/bench_data.py [--videos 64] [--repeats 5] [--workers 2] [--batch 4]

Unit: video frames per second = (sum of the frame counts of the videos gone through) / wall time.
Raw decoding reads every frame with cv2.VideoCapture.read(), once with OpenCV's default FFmpeg threads
and once with one thread (what data.py uses). The loader is TALDataset + data.Batches +
DataLoader(num_workers=2, collate_fn=data.collate), fresh workers every epoch as in lofi.py, going once
through the same videos at the tiny full fidelity 32 x 4 x 64^2 (stride 2); it delivers B * L * F
snippet frames per batch. The transport floor is the same DataLoader serving same-sized uint8 tensors
that cost nothing to make.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402
import synthetic  # noqa: E402  (beside this file)

FULL, F, STRIDE = data.Fidelity(32, 64, 64), 4, 2


def raw_decode(paths, threads):
    t, frames = time.perf_counter(), 0
    for p in paths:
        params = [cv2.CAP_PROP_N_THREADS, threads] if threads else []
        cap = cv2.VideoCapture(str(p), cv2.CAP_FFMPEG, params)
        while cap.read()[0]:
            frames += 1
        cap.release()
    return time.perf_counter() - t, frames


class Floor(torch.utils.data.Dataset):
    """TALDataset's item layout and sizes, at no cost: what the DataLoader itself takes."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, item):
        i, fid = item
        return dict(frames=torch.full((fid.L, F, 3, fid.H, fid.W), i % 255, dtype=torch.uint8),
                    segments=torch.zeros(2, 2), labels=["x"], id=str(i), duration=1.0, fidelity=fid, replaced=[])


def loader_epoch(ds, configs, epoch, args, cycle="long", persistent=None):
    # In order (train=False): every video once, the last batch short (the throughput counts them all).
    sampler = data.Batches(len(ds), args.batch, seed=0, train=False, configs=configs, cycle=cycle, c_s=1)
    sampler.set_epoch(epoch)
    loader = persistent or torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=args.workers,
                                                       collate_fn=data.collate, persistent_workers=False)
    t, delivered, seen = time.perf_counter(), 0, set()
    for batch in loader:
        delivered += batch["frames"].shape[:3].numel()
        seen.update(batch["ids"])
    assert len(seen) == len(ds)
    return time.perf_counter() - t, delivered


def items(ds):
    """Dataset-level cost: every video at full fidelity in this process (no DataLoader)."""
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", default="64x80", help="synthetic video HxW, e.g. 360x640 for ActivityNet-like frames")
    ap.add_argument("--fps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    t = time.perf_counter()
    anno = synthetic.synth(tmp / "synth", args.videos, seed=0, fps=args.fps,
                      size=tuple(int(x) for x in args.size.split("x")))
    synth_s = time.perf_counter() - t
    videos, _ = data.read_annotations(anno)
    vids = [videos[k] for k in sorted(videos)]
    vdir = tmp / "synth" / "videos"
    files = data.video_files(vdir)
    paths = [files[v.id] for v in vids]
    plain = data.TALDataset(vids, vdir, F, STRIDE, full=FULL)
    rows = {k: [] for k in ["raw_default", "raw_1", "loader", "prepare", "store", "clofi_store", "floor", "items",
                            "items_store"]}
    geometry = dict(snippets=FULL.L, frames=F, stride=STRIDE, size=FULL.H)
    for r in range(args.repeats):         # interleaved, so machine noise hits every row alike
        rows["raw_default"].append(raw_decode(paths, 0)[0])
        sec, total = raw_decode(paths, 1)
        rows["raw_1"].append(sec)
        sec, delivered = loader_epoch(plain, [FULL], r, args)
        rows["loader"].append(sec)
        root = tmp / f"store{r}"           # a fresh store every repeat
        t = time.perf_counter()
        data.prepare(anno, vdir, root, geometry, workers=args.workers)
        rows["prepare"].append(time.perf_counter() - t)
        stored = data.TALDataset(vids, data.FrameStore(root), F, STRIDE, full=FULL)
        rows["store"].append(loader_epoch(stored, [FULL], r, args)[0])
        rows["clofi_store"].append(loader_epoch(stored, data.c_lofi(FULL), r, args, cycle="short")[0])
        rows["floor"].append(loader_epoch(Floor(len(vids)), [FULL], r, args)[0])
        rows["items"].append(items(plain))
        rows["items_store"].append(items(stored))
        size = sum(p.stat().st_size for p in root.iterdir())
        shutil.rmtree(root)
    med = {k: statistics.median(v) for k, v in rows.items()}

    print(f"{len(vids)} synthetic videos ({args.size} mp4v, {args.fps} fps), {total} frames (synth: {synth_s:.1f} s); "
          f"loader: batch {args.batch}, {args.workers} workers, {FULL} x F={F}, stride {STRIDE}; median of "
          f"{args.repeats}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; cv2 {cv2.__version__}, "
          f"torch {torch.__version__}\n")
    print("| measurement | wall s | video frames/s | snippet frames/s delivered | vs raw (default) | vs raw (1 thread) |")
    print("|---|---|---|---|---|---|")
    label = {"raw_default": "raw decoding, cv2 read() every frame, OpenCV default FFmpeg threads",
             "raw_1": "raw decoding, cv2 read() every frame, 1 FFmpeg thread",
             "loader": "**loader from the video files** (2 workers)",
             "prepare": f"data.prepare into a frame store ({args.workers} workers)",
             "store": "**loader from the frame store** (2 workers)",
             "clofi_store": "loader, C-LoFi short cycle from the store (S/T/ST)",
             "floor": "DataLoader floor: same tensors, made at no cost (2 workers)",
             "items": "dataset alone, one process, video files",
             "items_store": "dataset alone, one process, frame store"}
    for k, name in label.items():
        fps = f"{delivered / med[k]:.0f}" if k in ("loader", "store", "floor") else "-"
        print(f"| {name} | {med[k]:.3f} | {total / med[k]:.0f} | {fps} | {med['raw_default'] / med[k]:.2f}x "
              f"| {med['raw_1'] / med[k]:.2f}x |")
    print(f"\nloader from files vs raw decoding: {med['raw_default'] / med['loader']:.2f}x OpenCV defaults, "
          f"{med['raw_1'] / med['loader']:.2f}x one FFmpeg thread (target >= 0.8)")
    print(f"loader from the store: {med['loader'] / med['store']:.2f}x the loader from files (dataset alone "
          f"{med['items'] / med['items_store']:.2f}x); the store on disk: {size / 2**20:.1f} MiB for {len(vids)} videos; "
          f"the videos: {sum(p.stat().st_size for p in paths) / 2**20:.1f} MiB")
    for k, v in rows.items():
        print(f"  {k}: {[round(x, 3) for x in v]}")

if __name__ == "__main__":
    main()
