"""The synthetic benchmarks, each a pure function of its seed, behind `python data.py synth --shape ...`:

    anet      synth(): ActivityNet-shaped untrimmed videos, the default target set of `bash train.sh`
    kinetics  synth_kinetics(): trimmed clips of other motions, stage 1's pre-training set (the paper's ACP)

They live beside the figures they produce (README.md here); other_synth.py is a third design, never tuned on.
Each writes OUT/videos/*.mp4 and an ActivityNet-layout OUT/anno.json that data.py reads like any other.
"""
import json
from itertools import chain
from pathlib import Path

import cv2
import numpy as np

import data

SYNTH_CLASSES = ("circular", "horizontal", "vertical")
KINETICS_CLASSES = ("sideways", "rise", "fall", "slant", "spin", "rock", "grow", "shrink", "figure8")


def _write_video(path, fps, frames):
    """BGR uint8 frames (H, W, 3), from an iterable -> an mp4v file."""
    frames = iter(frames)
    first = next(frames)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, first.shape[1::-1])
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write mp4v video")
    for frame in chain([first], frames):
        writer.write(frame)
    writer.release()


def _write_anno(out_dir, database):
    (out_dir / "anno.json").write_text(json.dumps(dict(version="synthetic", taxonomy=[], database=database), indent=1))
    return out_dir / "anno.json"


def synth(out_dir, videos=128, seed=0, fps=10, size=(64, 80)):
    """An ActivityNet-shaped synthetic dataset, a pure function of the seed, whose actions show only in motion:
    a checkered 24-pixel object (12-16 pixels were too weak a signal: looks got memorised) on a still background,
    six looks shared by all classes; one class per video, in turn (every fourth video validation), 1-3 instances
    of 10-40 % of a 15-30 s video in which the object oscillates on a circle, a horizontal or a vertical line;
    in most gaps, motion that is no action (Sec. 1's task discrepancy: camera shake, slides), as 'distractors'."""
    out_dir, (H, W) = Path(out_dir), size
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    database, P, M, S = {}, 24, 7, 2              # object side, largest excursion, largest shake (pixels)
    x_lo = (W - H) // 2                           # the centre H x H crop starts here
    lo, hi = np.array([M, x_lo + M]), np.array([H - M - P, x_lo + H - M - P])   # rest positions (y, x)
    looks, pool = 6, np.random.default_rng([seed, 2**31])
    backgrounds = np.stack([cv2.resize(pool.integers(70, 186, (H // 8, W // 8, 3), dtype=np.uint8), (W, H))
                            for _ in range(looks)])                                         # (looks, H, W, 3)
    objects = (255 * pool.integers(0, 2, (looks, 4, 4, 3))).astype(np.uint8).repeat(P // 4, 1).repeat(P // 4, 2)
    for k in range(videos):
        rng = np.random.default_rng([seed, k])
        n, cls = int(rng.integers(150, 301)) * fps // 10, (k + seed) % len(SYNTH_CLASSES)   # 15-30 s
        background, thing = backgrounds[rng.integers(looks)], objects[rng.integers(looks)]   # (H, W, 3), (P, P, 3)
        lengths = (rng.uniform(0.1, 0.4, rng.integers(1, 4)) * n).astype(int)
        lengths = (lengths * min(1.0, 0.7 * n / lengths.sum())).astype(int)
        # Instances in order, at least 1.5 s apart: the room left goes to the gaps in Dirichlet shares.
        gap = int(1.5 * fps)
        room = n - lengths.sum() - gap * (len(lengths) + 1)
        gaps = np.floor(rng.dirichlet(np.ones(len(lengths) + 1)) * max(room, 0)).astype(int) + gap
        starts = np.cumsum(gaps[:-1] + np.r_[0, lengths[:-1]])
        pos = np.repeat(rng.integers(lo, hi + 1)[None].astype(np.float64), n, 0)   # (n, (y, x)) object
        shake, notes, distractors = np.zeros((n, 2), int), [], []            # (n, (dy, dx)) camera
        # Distractors first, 1-3 s in the gaps (0.5 s clear of every instance); a slide moves later rests.
        for a, b in zip(np.r_[0, starts + lengths] + fps // 2, np.r_[starts, n] - fps // 2):
            if b - a < fps or rng.random() < 0.2:
                continue
            m = int(min(b - a, rng.integers(fps, 3 * fps + 1)))
            t0 = int(rng.integers(a, b - m + 1))
            if rng.random() < 0.5:
                shake[t0:t0 + m] = rng.integers(-S, S + 1, (m, 2))
                distractors.append(dict(segment=[t0 / fps, (t0 + m) / fps], kind="shake"))
            else:
                goal, w = rng.integers(lo, hi + 1), (np.arange(1, m + 1) / m)[:, None]   # (2,), (m, 1) ramp
                pos[t0:t0 + m] = (1 - w) * pos[t0] + w * goal
                pos[t0 + m:] = goal
                distractors.append(dict(segment=[t0 / fps, (t0 + m) / fps], kind="slide"))
        for a, b in zip(starts, starts + lengths):         # the action: a 0.8-1.6 s period, 4-7 pixels
            phi = 2 * np.pi * np.arange(b - a) / (rng.uniform(0.8, 1.6) * fps)
            amp = rng.uniform(4, M) / (2 if cls == 0 else 1)                   # circle radius or swing
            sin, cos, zero = amp * np.sin(phi), amp * (1 - np.cos(phi)), 0 * phi
            pos[a:b] += np.stack([[cos, sin], [zero, sin], [sin, zero]][cls], 1)
            notes.append(dict(segment=[a / fps, b / fps], label=SYNTH_CLASSES[cls]))
        noise = rng.normal(0, 2, (8, H, W, 3))
        canvas = cv2.copyMakeBorder(background, S, S, S, S, cv2.BORDER_REFLECT)   # room for the shake

        def frames():
            for t in range(n):
                frame = canvas.astype(np.float64)                            # (H + 2S, W + 2S, 3)
                y, x = np.round(pos[t]).astype(int) + S
                frame[y:y + P, x:x + P] = thing
                dy, dx = S + shake[t]
                yield np.clip(frame[dy:dy + H, dx:dx + W] + noise[rng.integers(8)], 0, 255).astype(np.uint8)
        _write_video(out_dir / "videos" / f"synth_{k:04d}.mp4", fps, frames())
        database[f"synth_{k:04d}"] = dict(subset="validation" if k % 4 == 3 else "training", duration=n / fps,
                                          annotations=notes, distractors=distractors)
    return _write_anno(out_dir, database)


def synth_kinetics(out_dir, clips=2000, seed=0, fps=10, size=(64, 80)):
    """A miniature Kinetics for stage 1 (the paper's ACP): trimmed 1-1.6 s clips, one class each, in turn (every
    fifth clip validation), one instance covering the clip. The classes are motion primitives, each the same class
    in a mirror (stage 1's augmentation flips): a one-off drift sideways, up, down or on a diagonal; a spin; a
    rocking rotation; growing or shrinking once; a figure eight.
    Speed, distance, period and start are drawn per clip, and so, independently of the class, is the look: an
    object of 14-26 pixels with its own random checkered texture, on its own smooth random background. No target
    set's class is among them (a swing on a circle, a line or a diagonal, a pulsing size: synth's SYNTH_CLASSES,
    tests/bench/other_synth.py): stage 1 has to transfer, as Kinetics to ActivityNet."""
    out_dir, (H, W) = Path(out_dir), size
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    database, x_lo = {}, (W - H) // 2
    for k in range(clips):
        rng, cls = np.random.default_rng([seed, k, 400]), k % len(KINETICS_CLASSES)
        n, P = int(rng.integers(fps, 1.6 * fps + 1)), int(rng.integers(14, 27))
        Q = 2 * P                                                  # room for the object turned and grown
        cells = int(rng.integers(2, 5))
        texture = cv2.resize(rng.integers(0, 256, (cells, cells, 3)).astype(np.uint8), (P, P),
                             interpolation=cv2.INTER_NEAREST)                            # (P, P, 3)
        pad = dict(top=P // 2, bottom=P - P // 2, left=P // 2, right=P - P // 2, borderType=cv2.BORDER_CONSTANT)
        tile, inside = cv2.copyMakeBorder(texture, **pad), cv2.copyMakeBorder(np.ones((P, P), np.float32), **pad)
        grid = int(rng.integers(3, 9))
        background = cv2.resize(rng.integers(40, 216, (grid, grid * W // H, 3)).astype(np.uint8), (W, H))
        t, speed = np.arange(n) - (n - 1) / 2, rng.uniform(2, 3)                        # pixels a frame
        phi = 2 * np.pi * np.arange(n) / (rng.uniform(0.8, 1.6) * fps) + rng.uniform(0, 2 * np.pi)
        amp, zero, one = rng.uniform(5, 10), 0 * t, 1 + 0 * t
        sx, sy = rng.choice([-1, 1], 2)                            # which way: the class does not say
        y, x, angle, scale = {                                     # offsets from the centre, degrees, factor
            "sideways": (zero, sx * speed * t, zero, one), "rise": (-speed * t, zero, zero, one),
            "fall": (speed * t, zero, zero, one), "slant": (sy * speed * t / 1.4, sx * speed * t / 1.4, zero, one),
            "spin": (zero, zero, sx * rng.uniform(15, 35) * t, one),
            "rock": (zero, zero, rng.uniform(30, 60) * np.sin(phi), one),
            "grow": (zero, zero, zero, 1 + 0.5 * t / t.max() * rng.uniform(0.6, 1)),
            "shrink": (zero, zero, zero, 1 - 0.5 * t / t.max() * rng.uniform(0.6, 1)),
            "figure8": (amp / 2 * np.sin(2 * phi), sx * amp * np.sin(phi), zero, one)}[KINETICS_CLASSES[cls]]
        reach = np.abs(np.concatenate([y, x])).max() + 0.35 * P * scale.max()   # at least half in the centre crop
        cy, cx = rng.uniform(reach, H - reach, 2) if reach < H / 2 else (H / 2, H / 2)
        noise = rng.normal(0, 2, (8, H, W, 3))
        canvas = cv2.copyMakeBorder(background, Q, Q, Q, Q, cv2.BORDER_REFLECT).astype(np.float64)

        def frames():
            for i in range(n):
                frame = canvas.copy()                                            # (H + 2Q, W + 2Q, 3)
                turn = cv2.getRotationMatrix2D((Q / 2, Q / 2), angle[i], scale[i])
                obj = cv2.warpAffine(tile, turn, (Q, Q)).astype(np.float64)
                mask = cv2.warpAffine(inside, turn, (Q, Q))[..., None]                   # (Q, Q, 1) in [0, 1]
                top, left = int(round(Q + cy + y[i] - Q / 2)), int(round(Q + x_lo + cx + x[i] - Q / 2))
                box = frame[top:top + Q, left:left + Q]
                box[:] = mask * obj + (1 - mask) * box
                yield np.clip(frame[Q:Q + H, Q:Q + W] + noise[rng.integers(8)], 0, 255).astype(np.uint8)
        _write_video(out_dir / "videos" / f"clip_{k:05d}.mp4", fps, frames())
        database[f"clip_{k:05d}"] = dict(subset="validation" if k % 5 == 4 else "training", duration=n / fps,
                                         annotations=[dict(segment=[0, n / fps], label=KINETICS_CLASSES[cls])])
    return _write_anno(out_dir, database)


def main(argv=None):
    """`python data.py synth OUT_DIR [--shape anet|kinetics] [--videos N] [--seed S]`."""
    p = data.Parser(prog="data.py synth", description="a synthetic dataset: OUT_DIR/videos/*.mp4, OUT_DIR/anno.json")
    p.add_argument("out_dir")
    p.add_argument("--shape", choices=("anet", "kinetics"), default="anet", help="anet: untrimmed videos (default); "
                   "kinetics: trimmed clips for stage 1, no anet class")
    p.add_argument("--videos", type=data.checked(int, lambda v: v >= 4, "at least 4 (3:1 training:validation)"),
                   help="anet: 128 videos, 3:1 training:validation; kinetics: 2000, 4:1")
    p.add_argument("--seed", type=data.nonnegative_int, default=0, help="the dataset is a pure function of the seed")
    args = p.parse_args(argv)
    make, count = (synth, 128) if args.shape == "anet" else (synth_kinetics, 2000)
    anno = make(args.out_dir, args.videos or count, args.seed)
    print(f"{args.videos or count} videos -> {Path(args.out_dir) / 'videos'}, annotations -> {anno}")
    return 0
