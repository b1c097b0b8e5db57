"""Benchmark of the frame store (issue 11) against raw video files, side by side in one run.

    python tests/bench/bench_store.py [--videos 4] [--seconds 60] [--repeats 3] [--encoder runs/acp/last.pt]

Videos: 360x640, 30 fps, --codec (mp4v or VP8), --seconds long, made here: a camera panning over a smooth scene with
fine texture, three textured objects moving across it, and sensor noise (sigma 1.5). Two action
instances each, in the first and the last tenth. Everything runs in this process on one core
(OpenCV and torch at one thread), so every rate is per core. Figures, each the median of --repeats
interleaved rounds:
  - loader: videos/s for one TALDataset item at full / S / T / ST fidelity of the paper preset
    (100 x 8 x 224^2 ...), from the store and from the video files
  - prepare: video frames decoded per second (the whole video, as prepare decodes it) against a
    plain cv2 read loop over the same file
  - store size per stored 224^2 frame against raw uint8 (150,528 bytes)
  - stage-1 clip (8 frames at stride 8, 224^2) from the store, instance in the last tenth vs the first
  - cosine similarity of encoder snippet features from store frames against raw frames: a random
    TSM-R18 at 224^2 on these videos, and, with --encoder, a trained checkpoint on the first 8
    validation videos of --synth at the checkpoint's own geometry
"""
import argparse
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
import lofi  # noqa: E402
import tsm  # noqa: E402

GEO = data.GEOMETRY["paper"]
FULL = data.Fidelity(GEO["snippets"], GEO["size"], GEO["size"])


def write_video(path, seconds, seed, fps=30, size=(360, 640), codec="mp4v"):
    """A panning camera over a smooth scene with fine texture, three moving textured objects, noise."""
    rng = np.random.default_rng(seed)
    H, W = size
    scene = sum(cv2.resize(rng.uniform(-1, 1, (H // s + 1, 2 * W // s + 1, 3)), (2 * W, H), interpolation=cv2.INTER_CUBIC)
                * (s / 4) ** 0.7 for s in (4, 16, 64))                                        # (H, 2W, 3) 1/f-like
    scene = np.clip(128 + 40 * scene / np.abs(scene).max(), 0, 255)
    things = [rng.integers(0, 256, (6, 6, 3)).repeat(10, 0).repeat(10, 1) for _ in range(3)]  # (60, 60, 3)
    paths = rng.uniform([0, 0, -4, -3], [H - 60, W - 60, 4, 3], (3, 4))                      # y, x, dy, dx
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (W, H))
    for t in range(seconds * fps):
        x0 = int(W / 2 + W / 2 * np.sin(t / (fps * 10)))                                      # pan
        frame = scene[:, x0:x0 + W].copy()
        for thing, (y, x, dy, dx) in zip(things, paths):
            yy, xx = int(abs((y + dy * t) % (2 * (H - 60)) - (H - 60))), int(abs((x + dx * t) % (2 * (W - 60)) - (W - 60)))
            frame[yy:yy + 60, xx:xx + 60] = thing
        out.write(np.clip(frame + rng.normal(0, 1.5, frame.shape), 0, 255).astype(np.uint8))
    out.release()


def read_all(path):
    cap, n = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1]), 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.no_grad()
def cosine(encoder, raw, stored):
    """Mean and min cosine of the encoder's snippet features (N, D) from two (N, F, 3, H, W) uint8 sets."""
    a, b = (encoder(tsm.normalize(x)).float() for x in (raw, stored))
    c = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return c.mean().item(), c.min().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--seconds", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--codec", default="mp4v", choices=["mp4v", "VP80"], help="VP80 (in .mkv): a codec that costs "
                   "what real ones do to decode (this OpenCV cannot write H.264)")
    p.add_argument("--snippets", type=int, default=12, help="snippets of each video through the encoder (cosine)")
    p.add_argument("--encoder", help="a trained lofi checkpoint: a second cosine, on --synth at its geometry")
    p.add_argument("--synth", default="data/synth", help="the synthetic set --encoder was trained on")
    args = p.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        run(args, Path(tmp))


def run(args, tmp):
    (tmp / "videos").mkdir()
    s = args.seconds
    database = {}
    ext = "mp4" if args.codec == "mp4v" else "mkv"
    for k in range(args.videos):
        write_video(tmp / "videos" / f"v{k}.{ext}", s, k, codec=args.codec)
        database[f"v{k}"] = dict(subset="training", duration=float(s), annotations=[
            dict(segment=[0.05 * s, 0.1 * s], label="a"), dict(segment=[0.9 * s, 0.95 * s], label="a")])
    anno = tmp / "anno.json"
    anno.write_text(__import__("json").dumps(dict(database=database)))
    videos, _ = data.read_annotations(anno)
    ids = sorted(videos)
    paths = [tmp / "videos" / f"{v}.{ext}" for v in ids]

    # prepare, and raw sequential decoding of the same files (frames per second, one core)
    rows = {k: [] for k in ("prepare", "read loop")}
    for r in range(args.repeats):
        store = tmp / f"store{r}"
        rows["prepare"].append(timed(lambda: data.prepare(anno, tmp / "videos", store, GEO, workers=1)))
        rows["read loop"].append(timed(lambda: [read_all(q) for q in paths]))
    frames = sum(read_all(q) for q in paths)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{args.videos} videos of {s} s, 360x640 30 fps {args.codec}, {frames} frames; one core")
    print(f"prepare: {frames / med['prepare']:.0f} frames/s, plain read loop: {frames / med['read loop']:.0f} frames/s "
          f"(prepare at {med['read loop'] / med['prepare']:.2f}x the read loop)")
    st = data.FrameStore(tmp / "store0")
    stored = sum(r["stored"] for r in st.records.values())
    size = sum(r["bytes"] for r in st.records.values())
    print(f"store: {stored} frames ({stored / args.videos:.0f} a video), {size / stored / 1e3:.1f} kB a frame, "
          f"{size / stored / (224 * 224 * 3):.3f} of raw uint8; {size / args.videos / 1e6:.1f} MB a video "
          f"(raw uint8: {stored * 224 * 224 * 3 / args.videos / 1e6:.0f} MB)")

    # loader items: store vs raw, at each fidelity
    configs = dict(zip(("full", "S", "T", "ST"), [FULL, *data.c_lofi(FULL)]))
    from_store = data.TALDataset(videos, st, GEO["frames"], GEO["stride"], full=FULL)
    from_files = data.TALDataset(videos, tmp / "videos", GEO["frames"], GEO["stride"], full=FULL)
    t = {(name, src): [] for name in configs for src in ("store", "files")}
    for _ in range(args.repeats):
        for name, fid in configs.items():
            for src, ds in (("store", from_store), ("files", from_files)):
                t[name, src].append(timed(lambda: [ds[(i, fid)] for i in range(len(ds))]) / len(ds))
    print("| fidelity | store videos/s | files videos/s | store / files |\n|---|---|---|---|")
    for name, fid in configs.items():
        a, b = (statistics.median(t[name, src]) for src in ("store", "files"))
        print(f"| {name} {fid} | {1 / a:.2f} | {1 / b:.2f} | {b / a:.1f}x |")

    # stage-1 clips: the instance in the first tenth vs the last tenth
    clips = data.ClipDataset(videos, st, ["a"], GEO["frames"], GEO["stride"], size=(224, 224), train=False,
                             augment=False)
    first, last = ([k for k, (i, j) in enumerate(clips.items) if j == jj] for jj in (0, 1))
    c = {"first": [], "last": []}
    for _ in range(args.repeats):
        for name, ks in (("first", first), ("last", last)):
            c[name].append(timed(lambda: [clips[k] for k in ks]) / len(ks))
    a, b = (statistics.median(c[k]) for k in ("first", "last"))
    print(f"stage-1 clip from the store: first tenth {a * 1e3:.1f} ms, last tenth {b * 1e3:.1f} ms, ratio {b / a:.2f}x")

    # feature cosine: store frames vs raw frames
    pick = lambda x: x[:: max(1, FULL.L // args.snippets)][:args.snippets]                  # (snippets, F, 3, H, W)
    raw = torch.cat([pick(from_files[i]["frames"]) for i in range(len(ids))])
    jpeg = torch.cat([pick(from_store[i]["frames"]) for i in range(len(ids))])
    torch.manual_seed(0)
    mean, low = cosine(tsm.TSM(tsm.TSMConfig(depth=18)).eval(), raw, jpeg)
    print(f"feature cosine, random TSM-R18, {len(raw)} snippets at 224^2: mean {mean:.4f}, min {low:.4f}")
    if args.encoder:                 # the trained tiny encoder on the data it was trained for
        ck = lofi.load_checkpoint(args.encoder)
        enc = tsm.TSM(tsm.TSMConfig(**ck["encoder_cfg"]))
        enc.load_state_dict(ck["encoder"])
        geo = {k: ck["args"][k] for k in ("snippets", "frames", "stride", "size")}
        full = data.Fidelity(geo["snippets"], geo["size"], geo["size"])
        synth, _ = data.read_annotations(Path(args.synth) / "anno.json", subset="validation")
        synth = {k: synth[k] for k in sorted(synth)[:8]}
        sub = tmp / "synth.json"
        sub.write_text(__import__("json").dumps(dict(database={k: dict(subset="validation", duration=v.duration,
                       annotations=[dict(segment=list(seg), label=l) for seg, l in zip(v.segments.tolist(), v.labels)])
                       for k, v in synth.items()})))
        data.prepare(sub, Path(args.synth) / "videos", tmp / "synth_store", geo, workers=1)
        a, b = (data.TALDataset(synth, src, geo["frames"], geo["stride"], full=full)
                for src in (Path(args.synth) / "videos", data.FrameStore(tmp / "synth_store")))
        raw = torch.cat([a[i]["frames"] for i in range(len(a))])
        jpeg = torch.cat([b[i]["frames"] for i in range(len(b))])
        mean, low = cosine(enc.eval(), raw, jpeg)
        print(f"feature cosine, {args.encoder} on {len(raw)} snippets of {len(a)} synthetic validation videos at "
              f"{geo['size']}^2: mean {mean:.4f}, min {low:.4f}")

if __name__ == "__main__":
    main()
