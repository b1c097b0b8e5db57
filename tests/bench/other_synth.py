"""A synthetic benchmark of another design than `data.py synth`, to check that the pipeline's recipe is
not tuned to its own generator (issue 10: "on a benchmark it has never seen, train.sh learns").

Differences from data.py's set: 96 x 72 frames at 15 fps, a filled disc (not a checkered square) on
a per-video random-dot background, four classes (left-right, up-down, diagonal swing, and a pulse:
the disc grows and shrinks in place), no distractor motion but a slow global brightness flicker
throughout, 20-40 s videos, 64 videos (48 training / 16 validation).

    python tests/bench/other_synth.py data/other && bash train.sh --anno data/other/anno.json \
        --videos data/other/videos --out runs/other
"""
import argparse
import json
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("left-right", "up-down", "diagonal", "pulse")


def make(out, videos=64, seed=0, fps=15, size=(72, 96)):
    out, (H, W) = Path(out), size
    (out / "videos").mkdir(parents=True, exist_ok=True)
    database = {}
    for k in range(videos):
        rng = np.random.default_rng([seed, k, 7])
        n, cls = int(rng.integers(20 * fps, 40 * fps + 1)), (k + k // 4) % len(CLASSES)   # every split holds all
        dots = rng.integers(40, 120, (H, W, 1)) * (rng.random((H, W, 1)) < 0.15)          # sparse random dots
        background = (60 + dots).repeat(3, 2).astype(np.float64)                            # (H, W, 3)
        colour = rng.integers(150, 256, 3).tolist()
        r0, cy, cx = 10, rng.integers(22, H - 22), rng.integers(W // 2 - 10, W // 2 + 11)
        count = int(rng.integers(1, 4))
        lengths = (rng.uniform(0.1, 0.3, count) * n * min(1.0, 0.6 / (0.3 * count))).astype(int)
        gaps = rng.dirichlet(np.ones(count + 1)) * (n - lengths.sum() - 2 * fps * count)
        starts = (np.cumsum(gaps[:-1]) + np.arange(count) * 2 * fps + np.r_[0, np.cumsum(lengths[:-1])]).astype(int)
        dy, dx, dr = np.zeros(n), np.zeros(n), np.zeros(n)
        notes = []
        for a, b in zip(starts, starts + lengths):
            s = np.sin(2 * np.pi * np.arange(b - a) / (rng.uniform(0.7, 1.4) * fps))
            amp = rng.uniform(6, 10)
            if cls == 0:
                dx[a:b] = amp * s
            elif cls == 1:
                dy[a:b] = amp * s
            elif cls == 2:
                dx[a:b], dy[a:b] = amp * s / 1.4, amp * s / 1.4
            else:
                dr[a:b] = 0.5 * amp * s
            notes.append(dict(segment=[a / fps, b / fps], label=CLASSES[cls]))
        flicker = 1 + 0.08 * np.sin(2 * np.pi * np.arange(n) / (rng.uniform(3, 6) * fps))
        path = out / "videos" / f"other_{k:04d}.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (W, H))
        for t in range(n):
            frame = background.copy()
            cv2.circle(frame, (int(round(cx + dx[t])), int(round(cy + dy[t]))), int(round(r0 + dr[t])), colour, -1)
            frame = frame * flicker[t] + rng.normal(0, 3, frame.shape)
            writer.write(np.clip(frame, 0, 255).astype(np.uint8))
        writer.release()
        database[f"other_{k:04d}"] = dict(subset="validation" if k % 4 == 3 else "training",
                                          duration=n / fps, annotations=notes)
    (out / "anno.json").write_text(json.dumps(dict(version="other synthetic", taxonomy=[], database=database)))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--videos", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make(a.out, a.videos, a.seed)
    print(f"{a.videos} videos -> {a.out}")
