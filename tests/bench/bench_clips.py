"""Stage-1 clip cost against where the instance lies (issue 11: an instance in the last tenth of a 60 s
video may cost at most 1.5x one in the first tenth). One clip of the paper preset (8 frames at stride 8,
224^2) from a 60 s 360x640 30 fps video, read with data.read_video as ClipDataset does (seek to the clip,
position checked) and, side by side, decoding from frame 0 as before; interleaved repeats, median.

    python tests/bench/bench_clips.py [--repeats 5] [--codec mp4v]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402


def write_video(path, seconds=60, fps=30, size=(360, 640), codec="mp4v"):
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size[::-1])
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[0], size[1], 3), np.uint8)
    for k in range(seconds * fps):                       # a moving texture: real inter-frame work
        out.write(np.roll(base, 4 * k, axis=1))
    out.release()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--codec", default="mp4v")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"long.{'avi' if args.codec == 'MJPG' else 'mp4'}"
        write_video(path, codec=args.codec)
        spans = {"first tenth (3-6 s)": (3.0, 6.0), "last tenth (54-57 s)": (54.0, 57.0)}
        times = {(s, w): [] for s in spans for w in (True, False)}
        for _ in range(args.repeats):
            for span, (start, end) in spans.items():
                for sought in (True, False):
                    index_fn = lambda n, fps: data.clip_indices(int(start * fps), int(end * fps), 0.5, 8, 8)
                    t = time.perf_counter()
                    data.read_video(path, index_fn, (224, 224), seek_first=sought)
                    times[span, sought].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        for sought in (True, False):
            first, last = (med[s, sought] for s in spans)
            print(f"{'seek (ClipDataset)' if sought else 'decode from frame 0 (before)'}, {args.codec}: "
                  f"first tenth {first * 1000:.0f} ms, last tenth {last * 1000:.0f} ms, ratio {last / first:.2f}x")


if __name__ == "__main__":
    main()
