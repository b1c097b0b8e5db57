"""Data for LoFi: annotations, OpenCV decoding, fidelity-aware snippet batches and the C-LoFi schedules
(Sec. 3.2, Eq. 1-4), the datasets, the frame store and a data check; `synth` runs tests/bench/synthetic.py.

    python data.py synth data/synth --videos 128 --seed 0    # mp4 files + ActivityNet-style anno.json
    python data.py check --anno data/synth/anno.json --videos data/synth/videos [--subset training] [--deep]
    python data.py prepare --anno A.json --videos DIR --store S --preset paper   # then lofi.py --store S

A video is L snippets of F frames at a stride (Sec. 3: 8 frames at stride 8), from video files or a frame store.
"""
import argparse
import fcntl
import json
import math
import multiprocessing
import os
import runpy
import signal
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

EXTENSIONS = ("mp4", "mkv", "webm", "avi")
TOLERANCE_S, TOLERANCE_FRAC = 1.0, 0.02   # container vs annotation duration; ~2 snippets at L = 100
REPLACE_TRIES = 16    # broken videos in a row before an item gives up (--max-bad has long stopped the run)


class BadInput(ValueError):
    """A bad flag, file or annotation: the scripts print its message as one line and exit with 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`prog: error: ...`), exit code 2, as for every bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def checked(parse, ok, what):
    """An argparse `type=` for lofi.py's and data.py's flags: `argument --workers: 0: must be ...`, exit 2."""
    def check(text):
        try:
            if ok(value := parse(text)):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"{text}: must be {what}")
    return check


positive_int = checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = checked(int, lambda v: v >= 0, "a non-negative integer")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
fraction = checked(float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
folder = checked(str, os.path.isdir, "a folder")


# ---------------- fidelity (Sec. 3.2)
@dataclass(frozen=True)
class Fidelity:
    """A mini-batch configuration L x H x W (Eq. 1): snippets per video, frame height and width."""
    L: int
    H: int
    W: int

    def __str__(self):
        return f"{self.L}x{self.H}x{self.W}"


def _reduce(full, r_t=1.0, r_s=1.0):
    # Sizes round to an even number of pixels: 224 / sqrt 2 -> 158 as in the paper, 64 / sqrt 2 -> 46.
    even = lambda x: max(2, 2 * int(x / 2 + 0.5))
    return Fidelity(max(1, int(full.L / r_t + 0.5)), even(full.H / r_s), even(full.W / r_s))


s_lofi = partial(_reduce, r_s=2)                     # Eq. (2): L x H/r_s x W/r_s        (Sec. 4.3: r_s = 2)
t_lofi = partial(_reduce, r_t=4)                     # Eq. (3): L/r_t x H x W            (r_t = 4)
st_lofi = partial(_reduce, r_t=2, r_s=math.sqrt(2))  # Eq. (4): both, a smaller reduction each


def c_lofi(full):
    """C-LoFi's grid, in the order it is cycled: S -> T -> ST."""
    return [s_lofi(full), t_lofi(full), st_lofi(full)]


def fidelity_at(configs, cycle, epoch, step, c_l=1, c_s=16):
    """The next configuration every c_l epochs (long cycle) or c_s batches (short: small epochs still see all)."""
    if cycle not in ("long", "short"):
        raise ValueError(f"cycle must be 'long' or 'short', not {cycle!r}")
    return configs[(epoch // c_l if cycle == "long" else step // c_s) % len(configs)]


# ---------------- annotations
@dataclass
class Video:
    id: str
    subset: str
    duration: float         # seconds, as annotated
    segments: np.ndarray    # (N, 2) float64 seconds, inside [0, duration]
    labels: list


def read_annotations(path, subset=None):
    """ActivityNet-1.3 / HACS JSON -> (dict id -> Video, report of the segments clipped to [0, duration] or dropped)."""
    try:
        entries = json.loads(Path(path).read_text())["database"].items()
    except OSError as e:
        raise BadInput(f"{path}: cannot read the annotation file ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError, AttributeError):
        raise BadInput(f"{path}: no 'database' mapping (ActivityNet / HACS layout expected)") from None
    videos, problems = {}, []
    for raw_id, entry in entries:
        # 'v_' + an 11-character YouTube id is the file-name prefix; real ids like 'v_UmAH95xls' stay whole.
        vid = raw_id[2:] if raw_id.startswith("v_") and len(raw_id) == 13 else raw_id
        try:
            if subset is not None and entry.get("subset") != subset:
                continue
            duration = float(entry["duration"])
            notes = entry.get("annotations", [])
            segs = np.array([a["segment"] for a in notes] or np.zeros((0, 2)))                # (N, 2)
            labels = [str(a.get("label", "")) for a in notes]
            if segs.ndim != 2 or segs.shape[1] != 2 or segs.dtype.kind not in "iuf":
                raise ValueError("a segment is not two numbers")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BadInput(f"{path}: video {raw_id}: malformed entry ({e})") from None
        if not duration > 0 or not np.isfinite(segs).all() or vid in videos:
            raise BadInput(f"{path}: video {raw_id}: repeated, or a duration or segment not finite and positive")
        inside = np.clip(segs.astype(np.float64), 0.0, duration)                          # (N, 2)
        keep, moved = inside[:, 1] > inside[:, 0], (inside != segs).any(1)
        problems += [f"{vid}: segment [{s:.2f}, {e:.2f}] {'runs outside' if k else 'is empty inside'} "
                     f"[0, {duration}] s, {'clipped' if k else 'dropped'}"
                     for (s, e), k, m in zip(segs, keep, moved) if m or not k]
        labels = [label for label, k in zip(labels, keep) if k]
        videos[vid] = Video(vid, entry.get("subset", ""), duration, inside[keep], labels)
    count = lambda outcome: sum(p.endswith(outcome) for p in problems)
    return videos, dict(videos=len(videos), segments=sum(len(v.segments) for v in videos.values()),
                        clipped=count("clipped"), dropped=count("dropped"), problems=problems)


def class_names(videos):
    """Sorted label names: the label <-> index mapping every stage shares."""
    videos = videos.values() if isinstance(videos, dict) else videos
    return sorted({label for v in videos for label in v.labels})


# ---------------- files and decoding
class VideoError(RuntimeError):
    """A video that cannot be used; the message names the file (hence the video id) and the reason."""


def video_files(video_dir):
    """One listing (no stat a name) -> dict id -> path: <id>.<ext> before v_<id>.<ext>, then EXTENSIONS order."""
    found = {}
    for name in os.listdir(video_dir):
        stem, _, ext = name.rpartition(".")
        if ext in EXTENSIONS:
            for vid, prefixed in [(stem, 0)] + ([(stem[2:], 1)] if stem.startswith("v_") else []):
                found.setdefault(vid, []).append(((prefixed, EXTENSIONS.index(ext)), Path(video_dir) / name))
    return {vid: min(candidates)[1] for vid, candidates in found.items()}


def worker_init(_):
    """DataLoader workers: one OpenCV thread each (they are the parallelism); a preemption's signal is their rank's."""
    cv2.setNumThreads(1)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})


def open_video(path):
    """-> (cv2.VideoCapture, frame count, fps) as the container states them; one FFmpeg thread (see tests/bench)."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    if not cap.isOpened():
        raise VideoError(f"{path}: OpenCV/FFmpeg cannot open it (not a video, truncated, or an unknown codec)")
    n, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), cap.get(cv2.CAP_PROP_FPS)
    if not (fps > 0 and n > 0):
        cap.release()
        raise VideoError(f"{path}: the container states {n} frames at {fps} fps (empty, or remux it to state them)")
    return cap, n, fps


def _mismatch(seconds, expected):
    return abs(seconds - expected) > max(TOLERANCE_S, TOLERANCE_FRAC * expected)


def fit_frame(img, size):
    """Centre-crop to the aspect of H x W, then scale; a large reduction first by a (fast) integer block average."""
    (H, W), (h, w) = size, img.shape[:2]
    s = min(h / H, w / W)                                   # source pixels per target pixel
    k = max(1, int(s))
    ch, cw = min(h, round(H * s)) // k * k, min(w, round(W * s)) // k * k
    y, x = (h - ch) // 2, (w - cw) // 2
    img = img[y:y + ch, x:x + cw]
    if k >= 2:
        img = cv2.resize(img, (cw // k, ch // k), interpolation=cv2.INTER_AREA)
    if img.shape[:2] != (H, W):
        img = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA if img.shape[0] > H else cv2.INTER_LINEAR)
    return img


def seek(path, cap, fps, frame):
    """-> (capture, the frame grab() decodes next): `frame`, grabbed, or 0 from a reopened file if the seek missed:
    the grabbed frame's timestamp says where it landed (OpenCV's frame counter says where the seek aimed)."""
    if frame > 0 and cap.set(cv2.CAP_PROP_POS_FRAMES, frame) and cap.grab() and \
            round(cap.get(cv2.CAP_PROP_POS_MSEC) * fps / 1000) == frame:
        return cap, frame + 1
    cap.release()
    return open_video(path)[0], 0


def unique_frames(idx):
    """Frame indices -> (wanted = np.unique(idx), arrange: frames (K, ...) -> (*idx.shape, ...)): one decode each."""
    idx = np.asarray(idx)
    wanted, inverse = np.unique(idx, return_inverse=True)
    if np.array_equal(wanted, idx.ravel()):
        return wanted, lambda frames: frames.reshape(*idx.shape, *frames.shape[1:])
    return wanted, lambda frames: np.take(frames, inverse.reshape(idx.shape), axis=0)


def read_video(path, index_fn, size, seek_first=False, put=None, frames=None):
    """The frames index_fn(num_frames, fps) asks for -> (frames (*idx.shape, 3, H, W) RGB uint8, n, fps), in one
    pass (seek_first: from a seek), or each BGR frame to put(j, frame) (then -> frame numbers, n, fps). A stream
    short of its container's count, within tolerance, is read again at the true count: no index is past its end."""
    cap, stated, fps = open_video(path)
    n = frames or stated
    try:
        wanted, arrange = unique_frames(index_fn(n, fps))
        cap, pos = seek(path, cap, fps, int(wanted[0])) if seek_first else (cap, 0)
        out = None if put else np.empty((len(wanted), 3, *size), np.uint8)                 # (K, 3, H, W)
        for j, t in enumerate(wanted):                   # grab() skips, retrieve() converts only these
            while pos <= t and cap.grab():
                pos += 1
            ok, img = cap.retrieve() if pos > t else (False, None)
            if not ok:
                break
            if put:
                put(j, fit_frame(img, size))
            else:
                out[j] = fit_frame(img, size).transpose(2, 0, 1)[::-1]              # channels first, BGR -> RGB
        else:
            return (wanted if put else arrange(out)), n, fps
    finally:
        cap.release()
    true_n = min(pos, t)                 # frames in the stream: grab() failed at pos, or retrieve() at t
    if true_n == 0:
        raise VideoError(f"{path}: no frame decodes")
    if frames or _mismatch(true_n / fps, n / fps):
        raise VideoError(f"{path}: stream ends at frame {true_n}, the container states {n} (truncated or corrupt)")
    return read_video(path, index_fn, size, seek_first, put, frames=true_n)


def snippet_indices(num_frames, L, F=8, stride=8):
    """Frame indices (L, F) int64 of L snippets, window i centred at (i + 0.5) n / L, clipped: short videos repeat
    frames, but the stride, the motion scale, never changes."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    i, f = np.arange(L, dtype=np.int64)[:, None], np.arange(F, dtype=np.int64)[None, :]
    # centre + offset = ((2i + 1) n + L stride (2f + 1 - F)) / 2L, floored in integers: exact.
    idx = ((2 * i + 1) * num_frames + L * stride * (2 * f + 1 - F)) // (2 * L)     # (L, F)
    return np.clip(idx, 0, num_frames - 1)


def dense_indices(n, F=8, stride=8, feat_stride=64):
    """Frame indices (T, F) int64 of snippets k spanning num_frames = F x stride frames from k x feat_stride, the
    fewest that reach frame n - 1: T = 1 + max(0, ceil((n - num_frames) / feat_stride)) (past it, the last repeats)."""
    T = 1 + max(0, -(-(n - F * stride) // feat_stride))
    idx = feat_stride * np.arange(T, dtype=np.int64)[:, None] + stride * np.arange(F, dtype=np.int64)[None, :]
    return np.minimum(idx, n - 1)                                                            # (T, F)


def clip_indices(first, end, u, F, stride):
    """F frames at a stride in the instance [first, end): centred, shifted by (u - 0.5) times the room left."""
    centre = (first + end) / 2 + (u - 0.5) * max(0, end - first - F * stride)
    idx = np.floor(centre - F * stride / 2 + stride * (np.arange(F) + 0.5)).astype(np.int64)   # (F,)
    return np.clip(idx, first, end - 1)


def instance_frames(segment, n, fps):
    """An instance (start, end) in seconds -> its frames [first, end) in a video of n frames at fps."""
    first = min(int(segment[0] * fps), n - 1)
    return first, max(first + 1, min(n, math.ceil(segment[1] * fps)))


# ---------------- frame store
# Full-fidelity geometry of each preset (lofi.py's PRESETS take it from here): what `prepare` stores.
GEOMETRY = {"paper": dict(snippets=100, frames=8, stride=8, size=224),
            "tiny": dict(snippets=32, frames=4, stride=2, size=64)}
JPEG = [cv2.IMWRITE_JPEG_QUALITY, 90]   # (4:2:0 colour, as in the source videos; README: size, feature cosine)
REDUCED = {1: cv2.IMREAD_COLOR, **{k: getattr(cv2, f"IMREAD_REDUCED_COLOR_{k}") for k in (2, 4, 8)}}   # libjpeg
RECORD = dict(id=None, frames=None, fps=None, duration=None, stored=0, bytes=0, error=None)   # a manifest line


def stored_frames(video, n, fps, geometry):
    """-> sorted frame indices: the snippets at each L of C-LoFi, and stage 1's clips (training: whole instances)."""
    F, stride, full = geometry["frames"], geometry["stride"], Fidelity(geometry["snippets"], 1, 1)
    parts = [snippet_indices(n, L, F, stride).ravel() for L in {c.L for c in [full, *c_lofi(full)]}]
    for s in video.segments:
        first, end = instance_frames(s, n, fps)
        parts.append(np.arange(first, end) if video.subset == "training" else clip_indices(first, end, 0.5, F, stride))
    return np.unique(np.concatenate(parts))


class FrameStore:
    """A folder `prepare` wrote: decoded once, any fidelity read without touching a video file.

    store.json       the geometry, JPEG quality and clip positions it was prepared for
    manifest.jsonl   a line per video and attempt (id, frames, fps, duration, stored, bytes, error); the last counts
    <id>.jpg         its stored frames (`stored_frames`) at full H x W, JPEGs back to back
    <id>.idx.npy     (K, 3) int64 frame number, byte offset, byte length; written last: the video is complete
    """

    def __init__(self, root):
        self.root, self.records = Path(root), {}
        try:
            self.config = json.loads((self.root / "store.json").read_text())
            manifest = (self.root / "manifest.jsonl").read_text()
        except (OSError, ValueError) as e:
            raise BadInput(f"{root}: not a frame store ({e}); make one with `python data.py prepare`") from None
        self.cut = manifest[-1:] not in ("", "\n")  # a kill cut the last line: prepare starts a new one after it
        for line in manifest.splitlines():
            try:
                r = json.loads(line)
            except ValueError:                       # the last line of a killed prepare: that video is redone
                continue
            if isinstance(r, dict) and {"id", "error"} <= r.keys():
                self.records[r["id"]] = r
        self.ready = {vid for vid, r in self.records.items() if r["error"] is None}

    def matches(self, snippets, frames, stride, size):
        """-> None, or why a run of this geometry cannot read the store."""
        want = dict(snippets=snippets, frames=frames, stride=stride, size=size)
        have = {k: self.config[k] for k in want}
        return None if have == want else f"prepared for {have}, this run needs {want}: prepare a store for it"

    def read(self, vid, index_fn, size):
        """As read_video, at H x W: -> (frames (*idx.shape, 3, H, W) RGB uint8, n, fps) as prepared."""
        r, side, jpg, (H, W) = self.records[vid], self.config["size"], self.root / f"{vid}.jpg", size
        wanted, arrange = unique_frames(index_fn(r["frames"], r["fps"]))
        index = np.load(self.root / f"{vid}.idx.npy")                                          # (K, 3)
        if len(absent := np.setdiff1d(wanted, index[:, 0])):
            raise VideoError(f"{jpg}: frames {absent[:5].tolist()} are not in the store (prepared for another "
                             "geometry or annotation file?)")
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale for the cost of that size (S-LoFi's 112^2 from 224^2); the
        # bilinear resize left is less than 2x, where it skips no pixel (INTER_AREA: 6x its 0.05 ms a frame).
        reduced = max(k for k in REDUCED if side // k >= max(H, W)) if side >= max(H, W) else 1
        out = np.empty((len(wanted), 3, H, W), np.uint8)                                     # (K, 3, H, W)
        with open(jpg, "rb") as f:
            for j, (_, offset, length) in enumerate(index[np.searchsorted(index[:, 0], wanted)]):
                f.seek(offset)
                try:
                    buf = f.read(length)
                    if len(buf) != length:
                        raise ValueError(f"the file ends {length - len(buf)} bytes early")
                    img = cv2.imdecode(np.frombuffer(buf, np.uint8), REDUCED[reduced])
                    if img is None:
                        raise ValueError("not a JPEG image")
                except (ValueError, cv2.error) as e:
                    raise VideoError(f"{jpg}: frame {wanted[j]} does not decode ({e}); prepare it again") from None
                if img.shape[:2] != (H, W):
                    img = cv2.resize(img, (W, H), interpolation=cv2.INTER_LINEAR)
                out[j] = img.transpose(2, 0, 1)[::-1]
        return arrange(out), r["frames"], r["fps"]


def atomic_save(path, write):
    """write(file) to a temporary file, then rename it: workers and ranks never see half a file."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)                  # a failed write leaves nothing behind


def hold(path):
    """-> `path` open under an exclusive POSIX lock (this process's, not its forks' like loader workers), or None."""
    f = open(path, "a")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except (BlockingIOError, PermissionError):       # EAGAIN or EACCES: held
        f.close()


def _prepare_one(job):
    """One video into the store (in a worker process) -> its manifest record."""
    video, path, root, geometry = job
    blobs, side = {}, geometry["size"]               # j -> JPEG; a second pass (stream shorter) overwrites

    def put(j, frame):
        blobs[j] = cv2.imencode(".jpg", frame, JPEG)[1]
    try:
        wanted, n, fps = read_video(path, lambda n, fps: stored_frames(video, n, fps, geometry), (side, side), put=put)
    except VideoError as e:
        return dict(RECORD, id=video.id, error=str(e))
    lengths = np.array([len(blobs[j]) for j in range(len(wanted))], np.int64)
    index = np.stack([wanted, np.cumsum(lengths) - lengths, lengths], 1)                      # (K, 3)
    atomic_save(root / f"{video.id}.jpg", lambda f: [f.write(blobs[j].tobytes()) for j in range(len(wanted))])
    atomic_save(root / f"{video.id}.idx.npy", lambda f: np.save(f, index))   # last: the video is complete
    return dict(RECORD, id=video.id, frames=n, fps=fps, duration=n / fps, stored=len(wanted), bytes=int(lengths.sum()))


def _unordered(fn, jobs, workers):
    """fn over jobs, results as they finish (a slow video does not hold back the record of others)."""
    if workers == 1:
        yield from map(fn, jobs)
        return
    # Fresh interpreters: a fork of a process whose OpenCV or torch threads hold a lock can hang in the child.
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=cv2.setNumThreads,
                               initargs=(1,))
    try:
        for future in as_completed([pool.submit(fn, job) for job in jobs]):
            yield future.result()
    finally:           # an error (a full disk): stop now, not after decoding every other video for nothing
        pool.shutdown(cancel_futures=True)


def prepare(anno, video_dir, root, geometry, workers=1):
    """Every annotated video not yet in the FrameStore at `root` into it; says how many are stored, failed, missing."""
    root, videos = Path(root), read_annotations(anno)[0]
    config = dict(geometry, jpeg=JPEG, clips="training: every instance frame; else: centred windows")
    if not (root / "store.json").exists() and root.exists() and (
            not root.is_dir() or {p.name for p in root.iterdir() if p.suffix != ".tmp"} - {"manifest.jsonl", "lock"}):
        raise BadInput(f"--store {root}: not a frame store, and not an empty folder for a new one")
    root.mkdir(parents=True, exist_ok=True)
    if not (lock := hold(root / "lock")):             # one `prepare` at a time; a killed one's is gone
        raise BadInput(f"--store {root}: another `prepare` is writing it (it holds {root / 'lock'})")
    with lock, open(root / "manifest.jsonl", "a") as manifest:
        if not (root / "store.json").exists():       # a new store (the manifest first): now a store
            atomic_save(root / "store.json", lambda f: f.write(json.dumps(config).encode()))
        if (store := FrameStore(root)).config != config:
            raise BadInput(f"--store {root}: prepared with other settings ({(root / 'store.json').read_text()}); "
                           "give another folder")
        done, files = store.ready, video_files(video_dir)
        todo = [videos[k] for k in sorted(videos) if k not in done]
        jobs = [(v, files[v.id], root, geometry) for v in todo if v.id in files]
        gone = [dict(RECORD, id=v.id, error=f"missing: no file in {video_dir}") for v in todo if v.id not in files]
        print(f"{len(done)} videos already in {root}; {len(jobs)} to decode")
        decoded = tqdm(_unordered(_prepare_one, jobs, workers), "prepare", len(jobs), disable=None)
        manifest.write("\n" * store.cut)           # a line cut by a kill stays alone (and is ignored)
        for record in chain(gone, decoded):
            manifest.write(json.dumps(record) + "\n")
            manifest.flush()                         # each finished video survives a kill
    final = [r for vid, r in FrameStore(root).records.items() if vid in videos]
    stored = sum(r["error"] is None for r in final)
    missing = sum((r["error"] or "").startswith("missing") for r in final)
    if len(final) > stored:
        print(f"failed and missing videos, with the reasons: {root / 'manifest.jsonl'}")
    print(f"prepared {stored} videos ({len(final) - stored - missing} failed, {missing} missing): "
          f"{sum(r['stored'] for r in final)} frames, {sum(r['bytes'] for r in final)} bytes -> {root}")


# ---------------- checks
def _probe(job):
    """One video's errors and warnings from decoding its first frame (deep: all of them)."""
    k, vid, duration, path, deep = job
    try:
        cap, n, fps = open_video(path)
    except VideoError as e:
        return k, [f"{vid}: {e}"], []
    try:
        decoded = sum(1 for _ in iter(cap.grab, False)) if deep else int(cap.grab())
    finally:
        cap.release()
    if decoded == 0:
        return k, [f"{vid}: {path}: no frame decodes (the container states {n})"], []
    errors, warnings = [], []
    if deep and decoded != n:
        (errors if _mismatch(decoded / fps, n / fps) else warnings).append(
            f"{vid}: {path}: {decoded} frames decode, the container states {n}")
    n = decoded if deep else n
    if _mismatch(n / fps, duration):
        errors.append(f"{vid}: {path}: lasts {n / fps:.2f} s, annotated {duration:.2f} s")
    return k, errors, warnings


def check(videos, video_dir, decode=True, classes=None, deep=False, workers=1, files=None):
    """-> (errors, warnings): files missing or undecodable (deep: count every frame), durations off, bad labels."""
    errors, warnings, probe = [], [], []
    files = video_files(video_dir) if files is None else files
    for v in videos:
        for label in v.labels:
            if not label.strip():
                errors.append(f"{v.id}: empty label")
            elif classes is not None and label not in classes:
                errors.append(f"{v.id}: label '{label}' is not a training class")
        if len(v.segments) == 0:
            warnings.append(f"{v.id}: no action instance")
        if v.id not in files:
            errors.append(f"{v.id}: no video file <id> or v_<id> .{'/.'.join(EXTENSIONS)} in {video_dir}")
        elif decode:
            probe.append((len(probe), v.id, v.duration, files[v.id], deep))
    for _, more_errors, more_warnings in sorted(_unordered(_probe, probe, workers if len(probe) > 1 else 1)):
        errors += more_errors                        # (in the annotation's order, whatever the workers did)
        warnings += more_warnings
    return errors, warnings


# ---------------- datasets
def normalised_segments(video):
    """A video's segments as fractions of its annotated duration: float32 tensor (N, 2) in [0, 1]."""
    return torch.from_numpy(np.clip(video.segments / video.duration, 0, 1)).float()


class _Videos(torch.utils.data.Dataset):
    """Both datasets: a fail-fast start (`check` without decoding), frames from the FrameStore or a file; a broken
    video's item (VideoError, file gone; a full disk propagates) is the next that reads, recorded in `replaced`."""

    def __init__(self, videos, source, classes=None):
        self.videos = list(videos.values() if isinstance(videos, dict) else videos)
        self.store = source if isinstance(source, FrameStore) else None
        files = {vid: None for vid in self.store.ready} if self.store else video_files(source)
        errors, _ = check(self.videos, self.store.root if self.store else source, False, classes, files=files)
        if errors:
            raise BadInput(f"{len(errors)} data problem(s); all of them: `python data.py check`\n"
                           + "\n".join(errors[:20]))
        self.paths, self.video_of = [files[v.id] for v in self.videos], range(len(self.videos))   # (clips: their own)

    def __len__(self):
        return len(self.video_of)

    def __getitem__(self, item):
        first, *fidelity = item if isinstance(item, tuple) else (item,)
        n, replaced = len(self), []
        for k in range(first, first + min(n, REPLACE_TRIES)):
            try:
                out = self._item(k % n, *fidelity)
            except (VideoError, FileNotFoundError) as e:
                replaced.append(dict(id=self.videos[self.video_of[k % n]].id, reason=str(e)))
                continue
            return dict(out, replaced=[dict(r, by=out["id"]) for r in replaced])
        raise VideoError(f"{len(replaced)} videos in a row failed to decode, from {replaced[0]['id']}: "
                         f"{replaced[0]['reason']}")

    def _read(self, i, index_fn, size, seek_first=False):
        if self.store:
            return self.store.read(self.videos[i].id, index_fn, size)
        return read_video(self.paths[i], index_fn, size, seek_first)


class TALDataset(_Videos):
    """(index, Fidelity), or an index at full fidelity -> dict(frames uint8 (L, F, 3, H, W), segments (N, 2) in [0, 1],
    labels, id, duration, fidelity, replaced, n, fps); feat_stride: frames (K, 3, H, W) of np.unique(dense_indices)."""

    def __init__(self, videos, source, F, stride, full=Fidelity(100, 224, 224), feat_stride=None):
        super().__init__(videos, source)
        self.F, self.stride, self.full, self.feat_stride = F, stride, full, feat_stride

    def _item(self, index, fid=None):
        v, fid = self.videos[index], fid or self.full
        index_fn = lambda n, fps: np.unique(dense_indices(n, self.F, self.stride, self.feat_stride)) \
            if self.feat_stride else snippet_indices(n, fid.L, self.F, self.stride)
        # The store decodes at H x W; a file at the full one, a lower fidelity resized from it (INTER_AREA a plane).
        frames, n, fps = self._read(index, index_fn, (fid.H, fid.W) if self.store else (self.full.H, self.full.W))
        if frames.shape[-2:] != (fid.H, fid.W):
            planes = frames.reshape(-1, *frames.shape[-2:])                                 # (L * F * 3, H0, W0)
            out = np.stack([cv2.resize(p, (fid.W, fid.H), interpolation=cv2.INTER_AREA) for p in planes])
            frames = out.reshape(*frames.shape[:-2], fid.H, fid.W)                          # (L, F, 3, H, W)
        return dict(frames=torch.from_numpy(frames), segments=normalised_segments(v), labels=list(v.labels),
                    id=v.id, duration=v.duration, fidelity=fid, n=n, fps=fps)


def collate(batch):
    """Items of either dataset -> dict(frames uint8 (B, ...), ids, replaced; clips: labels int64 (B,); videos:
    segments [(N, 2)], durations float64 (B,), the batch's one fidelity (as Batches gives it), n and fps)."""
    # default_collate stacks straight into shared memory inside a worker: one copy less per batch.
    out = dict(frames=torch.utils.data.default_collate([b["frames"] for b in batch]), ids=[b["id"] for b in batch],
               replaced=[r for b in batch for r in b["replaced"]])
    if "label" in batch[0]:                                                              # clips
        return dict(out, labels=torch.tensor([b["label"] for b in batch]))
    return dict(out, segments=[b["segments"] for b in batch], fidelity=batch[0]["fidelity"], counts=[
        (b["n"], b["fps"]) for b in batch], durations=torch.tensor([b["duration"] for b in batch], dtype=torch.float64))


class ClipDataset(_Videos):
    """Stage 1 (ACP+): F frames at a stride inside one action instance -> dict(frames uint8 (F, 3, H, W), label, id,
    replaced), placed by (seed, `epoch`, index) when training, else centred."""

    def __init__(self, videos, source, classes, F, stride, size=(224, 224), train=True, seed=0, augment=True):
        super().__init__(videos, source, classes)
        self.items = [(i, j) for i, v in enumerate(self.videos) for j in range(len(v.segments))]
        self.video_of = [i for i, _ in self.items]
        self.classes, self.F, self.stride, self.size = list(classes), F, stride, tuple(size)
        self.train, self.seed, self.augment, self.epoch = train, seed, augment, 0

    def _item(self, k):
        (i, j), rng = self.items[k], lambda *key: np.random.default_rng([self.seed, self.epoch, k, *key])
        v, u = self.videos[i], rng().random() if self.train else 0.5
        index_fn = lambda n, fps: clip_indices(*instance_frames(v.segments[j], n, fps), u, self.F, self.stride)
        frames = self._read(i, index_fn, self.size, seek_first=True)[0]                     # (F, 3, H, W)
        if self.train and self.augment:
            frames = augment_clip(frames, rng(1))
        return dict(frames=torch.from_numpy(frames), label=self.classes.index(v.labels[j]), id=v.id)


def augment_clip(frames, rng):
    """One random crop, flip, contrast and gain for all frames (F, 3, H, W), so the motion survives, the looks not."""
    n, _, H, W = frames.shape
    h, w = (int(round(rng.uniform(0.8, 1.0) * side)) for side in (H, W))
    y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    box = frames[:, :, y:y + h, x:x + w].reshape(n * 3, h, w).transpose(1, 2, 0)          # (h, w, F * 3)
    out = np.stack([cv2.resize(np.ascontiguousarray(box[..., c:c + 3]), (W, H), interpolation=cv2.INTER_LINEAR)
                    for c in range(0, n * 3, 3)])                                            # (F, H, W, 3)
    if rng.random() < 0.5:
        out = out[:, :, ::-1]
    gain = rng.uniform(0.7, 1.3) * rng.uniform(0.8, 1.2, 3)                                 # (3,) per channel
    mean = out.mean()
    out = (out - mean) * rng.uniform(0.6, 1.4) + mean * gain + rng.uniform(-30, 30)        # contrast, gain, shift
    return np.clip(out, 0, 255).astype(np.uint8).transpose(0, 3, 1, 2)                       # (F, 3, H, W)


class Batches:
    """The one batch sampler -> lists of indices (with `configs`: of (index, Fidelity), one a batch). train: a
    permutation (seed + epoch), global batches split in rank order, the last partial one dropped; else strided."""

    def __init__(self, n, per_rank, rank=0, world=1, seed=0, train=True, configs=None, cycle="long", c_l=1, c_s=16):
        self.n, self.B, self.rank, self.world, self.seed, self.train = n, per_rank, rank, world, seed, train
        self.configs, self.cycle, self.c_l, self.c_s = list(configs or []), cycle, c_l, c_s
        self.epoch, self.start_step = 0, 0
        self.steps = n // (per_rank * world) if train else -(-len(range(rank, n, world)) // per_rank)
        if train and self.steps == 0:
            raise BadInput(f"{n} videos cannot fill one batch of {world} x {per_rank} (--batch-size is global)")

    def set_epoch(self, epoch, start_step=0):   # start_step > 0: a run resumed inside the epoch
        self.epoch, self.start_step = epoch, start_step

    def config_at(self, epoch, step):
        if self.configs:
            return fidelity_at(self.configs, self.cycle, epoch, epoch * self.steps + step, self.c_l, self.c_s)

    def __len__(self):
        return self.steps - self.start_step

    def __iter__(self):
        if self.train:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            batches = order[:self.steps * self.world * self.B].view(self.steps, self.world, self.B)[:, self.rank]
        else:
            batches = torch.arange(self.rank, self.n, self.world).split(self.B)
        for s in range(self.start_step, self.steps):
            fid, batch = self.config_at(self.epoch, s), batches[s].tolist()
            yield [(i, fid) for i in batch] if fid else batch


def _first(ids, k=10):
    return ", ".join(ids[:k]) + (" ..." if len(ids) > k else "")


class Split:
    """A subset's videos with a file (sorted by id); those without are listed in <out>/missing.txt. Broken ones
    replaced in batches go to `pending`; flush() (a collective) logs the new ones to <out>/log.jsonl. Past max_bad
    the run stops; the evaluation counts them all as misses, as the official protocol does."""

    def __init__(self, videos, subset, names, where, out, max_bad, resume=False):
        everything = {k: v for k, v in videos.items() if v.subset == subset}
        if not everything:
            raise BadInput(f"no videos in subset '{subset}' of the annotation file")
        self.subset, self.total, self.out, self.max_bad, self.pending = subset, len(everything), Path(out), max_bad, []
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.videos = [everything[k] for k in sorted(everything) if k in names]
        self.missing = sorted(k for k in everything if k not in names)
        log = self.out / "log.jsonl"                 # a resumed run: what it logged before is known
        events = [json.loads(line) for line in open(log)] if resume and log.exists() else []
        self.broken = {e["id"]: e for e in events if e.get("event") == "broken" and e.get("subset") == subset}
        if self.missing and self.rank == 0:
            listed = self.out / "missing.txt"
            known = set(listed.read_text().splitlines()) if listed.exists() else set()   # (a resumed run)
            with open(listed, "a") as f:
                f.writelines(f"{vid}\t{subset}\n" for vid in self.missing if f"{vid}\t{subset}" not in known)
            print(f"{len(self.missing)} of {self.total} {subset} videos have no file in {where}, skipped: "
                  f"{_first(self.missing)} (all in {listed})", flush=True)
        self.check(f"have no file in {where} (wrong folder?)")
        if not self.videos:
            raise BadInput(f"no {subset} video has a file in {where}")

    def check(self, what="are missing or broken"):
        bad = sorted(self.missing + list(self.broken))
        if len(bad) > self.max_bad * self.total:
            raise BadInput(f"{len(bad)} of {self.total} {self.subset} videos {what}, more than --max-bad "
                           f"{self.max_bad:g}: {_first(bad)}")

    def flush(self, where=""):
        parts = [self.pending]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, self.pending)
        new = {r["id"]: r for part in parts for r in part if r["id"] not in self.broken}
        self.pending = []
        if new:
            self.broken.update(new)
            if self.rank == 0:
                with open(self.out / "log.jsonl", "a") as f:
                    f.writelines(json.dumps(dict(event="broken", subset=self.subset, where=where, **r)) + "\n"
                                 for r in new.values())
                print(f"{len(new)} {self.subset} video(s) failed to decode {where} and were replaced or skipped: "
                      + "; ".join(f"{r['id']} ({r['reason']})" for r in new.values()), flush=True)
            self.check()


# ---------------- command line
def main(argv=None):
    parser = Parser(prog="data.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("synth", help="write a synthetic dataset: OUT_DIR/videos/*.mp4 and OUT_DIR/anno.json (its flags: "
                   "synth -h)", prefix_chars="+", add_help=False).add_argument("flags", nargs="*")   # (all: its own)
    check_p = sub.add_parser("check", help="list every problem that would break or mislabel training")
    prepare_p = sub.add_parser("prepare", help="decode every video once into a frame store that every stage can read")
    for p in (check_p, prepare_p):
        p.add_argument("--anno", required=True, help="ActivityNet / HACS annotation JSON (prepare: all subsets)")
        p.add_argument("--videos", required=True, type=folder, help="folder of <id>.<ext> or v_<id>.<ext> files")
        p.add_argument("--workers", type=positive_int, default=os.cpu_count(), help="decoding processes (default: all)")
    check_p.add_argument("--subset", help="check only this subset (default: all)")
    check_p.add_argument("--deep", action="store_true", help="count every frame (ActivityNet: ~22 h over --workers)")
    prepare_p.add_argument("--store", required=True, help="the store folder (a rerun adds what is not yet in it)")
    prepare_p.add_argument("--preset", default="paper", choices=GEOMETRY, help="the geometry to store (default paper)")
    for key in GEOMETRY["paper"]:
        prepare_p.add_argument(f"--{key}", type=positive_int, help=f"the preset's {key}, as lofi.py --{key} sets it")
    args = parser.parse_args(argv)
    try:
        if args.command == "synth":                  # its flags live with the generators
            return runpy.run_path(str(Path(__file__).parent / "tests" / "bench" / "synthetic.py"))["main"](args.flags)
        if args.command == "prepare":
            geometry = {k: getattr(args, k) or v for k, v in GEOMETRY[args.preset].items()}
            prepare(args.anno, args.videos, args.store, geometry, args.workers)
            return 0
        training = [v for v in read_annotations(args.anno)[0].values() if v.subset == "training"]
        videos, report = read_annotations(args.anno, args.subset)
    except (BadInput, OSError) as e:                 # OSError: a full disk, a store folder gone read-only
        parser.error(str(e))
    errors, warnings = check(videos.values(), args.videos, classes=class_names(training) if training else None,
                             deep=args.deep, workers=args.workers)
    warnings = report["problems"] + warnings
    for line in [f"error: {e}" for e in errors] + [f"warning: {w}" for w in warnings]:
        print(line)
    print(f"{len(videos)} videos, {report['segments']} segments ({report['clipped']} clipped, {report['dropped']} "
          f"dropped): {len(errors)} errors, {len(warnings)} warnings")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
