"""ActivityNet-1.3 evaluation: detection mAP at tIoU 0.50:0.05:0.95 and proposal AR@AN.

The LoFi paper (Sec. 4.1, "Evaluation metrics") reports mAP at tIoU {0.5, 0.75, 0.95} and the
average mAP over the ten thresholds 0.50:0.05:0.95, computed with the official ActivityNet
evaluator (`ANETdetection`, copied by G-TAD; spec/gtad.md Sec. 6). This file gives the official
numbers in seconds instead of minutes. The official semantics, reproduced exactly:
  - the classes are the labels of the ground truth in the subset; mAP is the mean AP over them;
  - per class, predictions are taken in the order np.argsort(scores)[::-1] over that class's
    predictions in file order (numpy's sort fixes the order of ties, so we call the same sort);
  - each prediction takes the not yet matched ground truth of its video and class with the highest
    tIoU at or above the threshold (candidates in np.argsort(tIoU)[::-1] order, again for ties),
    otherwise it is a false positive, as is every prediction for a video without that class;
  - AP is the VOC-2011 interpolated AP (area under the precision envelope).
Proposals (`--proposals`) follow the official `eval_proposal`: labels ignored, at most 100
proposals a video on average, AR averaged over the same ten thresholds, AUC of AR vs AN in %.
Where we differ: two zero-length segments have tIoU 1 if they coincide and 0 otherwise (the
official 0/0 is NaN, which its loop counts as a match wherever the two lie); a class without
predictions has AP 0 (the official code raises); bad input raises ValueError naming the file,
video and reason, segments that end before they start included. Video ids are compared without
a leading "v_". Predictions for videos outside the subset still count, as officially (false
positives / the proposal total), with a warning saying how many.

    python evaluate.py --gt anno.json --pred runs/x/detections.json      # table + average-mAP
    python evaluate.py --gt anno.json --pred proposals.json --proposals  # AR@1/5/10/100, AUC
    python evaluate.py --gt anno.json --pred det.json --subset validation --json out.json
    python evaluate.py --gt anno.json --pred det.json --blocked missing_files.txt  # OpenTAD's protocol
Bad input: a message on stderr and exit status 2. Tests: python -m pytest -q tests/test_evaluate.py
Speed, 2 CPU cores: 4,728 validation videos x 100 predictions (46 MB), end to end, take about as
long as json.load of that file alone, and 7-8x less than a per-prediction loop.
"""
import argparse
import gc
import json
import numbers
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

THRESHOLDS = np.linspace(0.5, 0.95, 10)  # tIoU 0.50:0.05:0.95, as the official evaluator
MAX_PROPOSALS = 100  # average number of proposals a video, the official AR@AN setting
BLOCK_LIST_EXTENSIONS = {"npy", "npz", "pt", "pkl", "mp4", "mkv", "webm", "avi"}


def normalise_id(vid):
    """ActivityNet ids appear with and without the YouTube 'v_' prefix; compare them without it."""
    return vid[2:] if vid.startswith("v_") else vid


@dataclass
class GroundTruth:
    videos: list  # normalised ids of the subset's videos, file order
    index: dict  # normalised id -> position in videos
    classes: list  # label names, in order of first appearance
    video: np.ndarray  # (N,) video of each ground-truth segment
    label: np.ndarray  # (N,) class of each segment
    segment: np.ndarray  # (N, 2) seconds


@dataclass
class Predictions:
    video: np.ndarray  # (P,) index into GroundTruth.videos, -1 outside the subset
    label: np.ndarray  # (P,) class index (-1 when labels are ignored)
    score: np.ndarray  # (P,)
    segment: np.ndarray  # (P, 2) seconds


def tiou(a, b):
    """Temporal IoU of segments a (..., 2) and b (..., 2), the official segment_iou arithmetic."""
    inter = np.clip(np.minimum(a[..., 1], b[..., 1]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    union = (b[..., 1] - b[..., 0]) + (a[..., 1] - a[..., 0]) - inter
    # union is 0 only for two zero-length segments: equal points are the same segment
    same = np.array(a[..., 0] == b[..., 0], dtype=np.float64)
    return np.divide(inter, union, out=same, where=union > 0)


def _json(data, name):
    try:
        return json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{name}: not valid JSON ({e})") from None


def _number(x, where):
    if not isinstance(x, numbers.Real) or isinstance(x, (bool, np.bool_)):  # nor is "0.5"
        raise ValueError(f"{where}: expected a number, got {x!r}")
    try:
        return float(x)
    except OverflowError:  # an integer beyond float range; the finiteness check reports it
        return float("inf")


def _well_formed(item, fields):
    """A dict holding `fields`, a [start, end] segment among them and a string label if asked."""
    return isinstance(item, dict) and all(f in item for f in fields) and \
        isinstance(item["segment"], (list, tuple)) and len(item["segment"]) == 2 and \
        ("label" not in fields or isinstance(item["label"], str))


def _check_numbers(values, where):
    """values (n, k) ending in start, end: raise at a non-finite row or reversed segment."""
    for bad, reason in ((~np.isfinite(values).all(axis=1), "a number is not finite"),
                        (values[:, -1] < values[:, -2], "the segment ends before it starts")):
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where(i)}: {reason} {values[i].tolist()}")


@contextmanager
def _no_gc():
    """Parsing makes a million small acyclic objects; the cyclic collector would walk them over and
    over for nothing (0.1-0.3 s of the 1.5 s on 4,728 x 100 predictions)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_blocked(path):
    """The video ids of a block list, one a line, its first field (`v_` and a video or feature file's extension
    allowed): lofi.py's <run>/missing.txt and OpenTAD's missing_files.txt alike."""
    ids = set()
    for line in Path(path).read_text().splitlines():
        if line.split():
            name = line.split()[0]
            stem, dot, ext = name.rpartition(".")
            ids.add(normalise_id(stem if dot and ext.lower() in BLOCK_LIST_EXTENSIONS else name))
    return ids


def as_ground_truth(videos, subset="validation"):
    """An annotation dict ('database' format) of videos with .id, .duration, .segments and .labels (data.Video)."""
    return dict(database={v.id: dict(subset=subset, duration=v.duration, annotations=[
        dict(segment=[float(x) for x in s], label=label) for s, label in zip(v.segments, v.labels)]) for v in videos})


def load_ground_truth(gt, subset="validation", blocked=()):
    """GroundTruth of one subset from an annotation file ('database' format) or its loaded dict, less the
    videos whose ids are in `blocked` (normalised ids: the evaluation on the videos still available)."""
    name = "ground-truth dict" if isinstance(gt, dict) else str(gt)
    doc = gt if isinstance(gt, dict) else _json(Path(gt).read_bytes(), name)
    if not isinstance(doc, dict) or not isinstance(doc.get("database"), dict):
        raise ValueError(f"{name}: no 'database' object; expected an ActivityNet annotation file")
    videos, index, classes, rows, where = [], {}, {}, [], []
    for raw, v in doc["database"].items():
        if not isinstance(v, dict) or v.get("subset") != subset:
            continue
        vid = normalise_id(raw)
        if vid in blocked:
            continue
        if vid in index:
            raise ValueError(f"{name}: video {raw} appears twice (ids are compared without 'v_')")
        index[vid] = len(videos)
        videos.append(vid)
        for k, a in enumerate(v.get("annotations", [])):
            here = f"{name}: video {raw}, annotation {k}"
            if not _well_formed(a, ("label", "segment")):
                raise ValueError(f"{here}: expected {{'label': str, 'segment': [start, end]}}, "
                                 f"got {a!r}")
            rows.append((index[vid], classes.setdefault(a["label"], len(classes)),
                         _number(a["segment"][0], here), _number(a["segment"][1], here)))
            where.append(here)
    if not videos:
        raise ValueError(f"{name}: no video of subset {subset!r}")
    if not rows:
        raise ValueError(f"{name}: the videos of subset {subset!r} have no annotated segments")
    table = np.array(rows, dtype=np.float64)  # (N, 4) video, class, start, end
    _check_numbers(table[:, 2:], where.__getitem__)
    return GroundTruth(videos, index, list(classes), table[:, 0].astype(np.int64),
                       table[:, 1].astype(np.int64), table[:, 2:])


# The fast path reads the plain json.dump layout of the ActivityNet result format with one regex
# pass instead of building half a million dicts; anything else (other key order, indentation,
# escapes, NaN) goes to json, so both paths return the same columns and raise the same errors.
# Possessive quantifiers (*+, ?+) never give back what they took (JSON never needs it): 30 % faster.
_NUM = rb"-?+(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][-+]?+[0-9]++)?+"  # JSON's number grammar
_STR = rb'"([^"\\\x00-\x1f]*+)"'  # a JSON string without escapes
_PRED = re.compile(rb'\{"label": ?+' + _STR + rb', ?+"score": ?+(' + _NUM + rb', ?+"segment": ?+\['
                   + _NUM + rb', ?+' + _NUM + rb')\]\}')
_HEAD = re.compile(rb'(.*"results": ?\{)' + _STR + rb": ?\[", re.S)
_NEXT_VIDEO = re.compile(rb"\], ?" + _STR + rb": ?\[")


def _fast_columns(data):
    """(ids, counts, label names, label codes, values (P, 3)) of a plain result file, else None."""
    parts = _PRED.split(data)  # [gap, label, numbers, gap, label, numbers, ..., gap]
    gaps, labels, numbers = parts[0::3], parts[1::3], parts[2::3]
    head = _HEAD.fullmatch(gaps[0]) if labels else None
    outside = gaps[0] + gaps[-1]  # the top-level object's other keys: one "results", no escapes
    if head is None or not gaps[-1].startswith(b"]") or outside.count(b'"results"') != 1 or \
            b"\\" in outside:
        return None
    try:  # what surrounds the predictions must be JSON too, with "results" at the top
        rest = json.loads(head[1] + gaps[-1][1:])
    except ValueError:
        return None
    inner = gaps[1:-1]  # ", " between predictions, '], "id": [' between videos
    new_video = np.flatnonzero(np.fromiter(map(len, inner), np.int64, len(inner)) > 2).tolist()
    found = [_NEXT_VIDEO.fullmatch(inner[i]) for i in new_video]
    if not isinstance(rest, dict) or rest.get("results") != {} or not all(found) or \
            inner.count(b", ") + inner.count(b",") + len(found) != len(inner):
        return None
    ids = [head[2]] + [m[1] for m in found]
    starts = np.array([0] + [i + 1 for i in new_video] + [len(labels)])
    names = list(dict.fromkeys(labels))
    codes = np.fromiter(map({n: i for i, n in enumerate(names)}.__getitem__, labels), np.int64,
                        len(labels))
    values = np.fromstring(b",".join(numbers).replace(b'"segment":', b"").replace(b"[", b""),
                           sep=",")  # score, start, end per prediction, parsed in C
    try:
        ids, names = [i.decode() for i in ids], [n.decode() for n in names]
    except UnicodeDecodeError:
        return None
    if len(set(ids)) != len(ids) or values.size != 3 * len(labels):
        return None
    return ids, np.diff(starts), names, codes, values.reshape(-1, 3)


def _columns(doc, name, need_labels):
    """The same columns as _fast_columns from a loaded result dict, checking every field."""
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise ValueError(f"{name}: no 'results' object; expected the ActivityNet result format")
    fields = ("label", "score", "segment") if need_labels else ("score", "segment")
    ids, counts, names, codes, values = [], [], {}, [], []
    for vid, items in doc["results"].items():
        if not isinstance(items, list):
            raise ValueError(f"{name}: video {vid}: expected a list of predictions, got {items!r}")
        ids.append(vid)
        counts.append(len(items))
        for k, p in enumerate(items):
            here = f"{name}: video {vid}, prediction {k}"
            if not _well_formed(p, fields):
                raise ValueError(f"{here}: expected {{'label': str, 'score': number, "
                                 f"'segment': [start, end]}}, got {p!r}")
            codes.append(names.setdefault(p["label"], len(names)) if need_labels else -1)
            values.append([_number(x, here) for x in (p["score"], *p["segment"])])
    return (ids, np.array(counts, np.int64), list(names), np.array(codes, np.int64),
            np.array(values, np.float64).reshape(-1, 3))


def load_predictions(pred, truth, subset="validation", need_labels=True, blocked=()):
    """Predictions from a result file or its loaded dict, resolved against the ground truth, less those of the
    `blocked` videos (as the official evaluator leaves out its blocked videos)."""
    if isinstance(pred, dict):
        name = "predictions dict"
        columns = _columns(pred, name, need_labels)
    else:
        name, data = str(pred), Path(pred).read_bytes()
        if not data.strip():
            raise ValueError(f"{name}: empty prediction file")
        columns = _fast_columns(data) or _columns(_json(data, name), name, need_labels)
    ids, counts, names, codes, values = columns
    if not len(values):
        raise ValueError(f"{name}: no predictions")
    first = np.cumsum(counts) - counts

    def where(i):
        v = int(np.searchsorted(first, i, side="right")) - 1
        return f"{name}: video {ids[v]}, prediction {i - first[v]}"

    _check_numbers(values, where)
    norm = [normalise_id(v) for v in ids]
    if len(set(norm)) != len(norm):
        twice = sorted(v for v in ids if norm.count(normalise_id(v)) > 1)
        raise ValueError(f"{name}: the same video appears twice: {twice} "
                         "(ids are compared without 'v_')")
    keep = np.repeat(np.array([v not in blocked for v in norm], bool), counts)      # (P,)
    label = np.full(len(values), -1, np.int64)
    if need_labels:
        to_class = np.array([truth.classes.index(n) if n in truth.classes else -1 for n in names])
        label = to_class[codes]
        if ((label < 0) & keep).any():
            i = int(np.flatnonzero((label < 0) & keep)[0])
            raise ValueError(f"{where(i)}: label {names[codes[i]]!r} is not a ground-truth class "
                             f"of subset {subset!r}")
    slot_video = np.array([truth.index.get(v, -1) for v in norm], np.int64)
    outside = [v for v, s, n in zip(ids, slot_video, norm) if s < 0 and n not in blocked]
    if outside:
        n = int(counts[(slot_video < 0) & np.array([v not in blocked for v in norm], bool)].sum())
        warnings.warn(f"{name}: {len(outside)} of {len(ids)} videos ({n} predictions) are not "
                      f"videos of subset {subset!r} in the ground truth, e.g. {outside[:3]}; "
                      "their predictions still count, as in the official evaluator", stacklevel=3)
    return Predictions(np.repeat(slot_video, counts)[keep], label[keep], values[keep, 0], values[keep, 1:])


def _match(truth, preds, rank, thresholds):
    """(T, P) true positives of the official greedy matching, all thresholds at once.

    Matching is independent per (class, video) group. Within a group, take the earliest prediction
    (in score order) with any free ground truth at tIoU >= threshold; it takes its best one; drop
    that prediction and that ground truth; repeat. Each round settles one match in every group.
    """
    V, T = len(truth.videos), len(thresholds)
    gt_key = truth.label * V + truth.video  # (N,) group of each ground truth
    gt_sorted = np.argsort(gt_key, kind="stable")  # file order within a group, as the official
    keys = gt_key[gt_sorted]
    p_key = np.where(preds.video >= 0, preds.label * V + preds.video, -1)  # (P,)
    lo = np.searchsorted(keys, p_key, "left")
    n_gt = np.searchsorted(keys, p_key, "right") - lo
    proc = np.flatnonzero(n_gt > 0)  # predictions with ground truth, group by group in score order
    proc = proc[np.argsort(p_key[proc] * len(rank) + rank[proc])]
    cnt = n_gt[proc]
    start = np.cumsum(cnt) - cnt
    slot = np.repeat(np.arange(len(proc)), cnt)  # (K,) every (prediction, ground truth) pair
    gt = gt_sorted[np.repeat(lo[proc] - start, cnt) + np.arange(len(slot))]  # (K,)
    iou = tiou(preds.segment[proc[slot]], truth.segment[gt])  # (K,)
    # A prediction tries its ground truths in the official order np.argsort(tIoU)[::-1], whose
    # order of equal tIoUs depends on numpy's sort; a row-wise argsort gives the same per row.
    pref = np.arange(len(slot))
    for c in np.unique(cnt[cnt > 1]):
        cols = start[cnt == c][:, None] + np.arange(c)  # (n, c) pairs of predictions with c truths
        pref[cols] = np.take_along_axis(cols, np.argsort(iou[cols], axis=1)[:, ::-1], axis=1)
    pref = pref[iou[pref] >= thresholds.min()]  # lower tIoUs never match
    slot, gt, iou = slot[pref], gt[pref], iou[pref]
    t, k = np.nonzero(iou >= thresholds[:, None])  # (T, K) -> candidates, sorted by t then pair
    group = t * len(truth.classes) * V + p_key[proc][slot[k]]
    slot, gt = slot[k], gt[k]
    tp = np.zeros((T, len(preds.score)), bool)
    while len(group):
        first = np.r_[True, group[1:] != group[:-1]]  # best remaining candidate of each group
        tp[t[first], proc[slot[first]]] = True
        lead = np.flatnonzero(first)[np.cumsum(first) - 1]  # each candidate's group leader
        keep = (slot != slot[lead]) & (gt != gt[lead])  # prediction settled, ground truth taken
        t, group, slot, gt = t[keep], group[keep], slot[keep], gt[keep]
    return tp


def interpolated_ap(tp, n_truth):
    """VOC-2011 AP of predictions in score order, tp (T, n): area under the precision envelope."""
    hits = np.cumsum(tp, axis=1)  # (T, n)
    prec = hits / np.arange(1, tp.shape[1] + 1)  # (T, n)
    prec = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]  # best precision from here on
    step = np.diff(hits / n_truth, axis=1, prepend=0.0)  # recall gained at each prediction
    return (step * prec).sum(axis=1)  # (T,); beyond the last prediction the precision is 0


def detection_map(gt, pred, subset="validation", thresholds=THRESHOLDS, blocked=()):
    """(mAP at each tIoU threshold (T,), average mAP); gt and pred are paths or loaded dicts; the `blocked`
    videos (ids) leave both."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    with _no_gc():
        truth = load_ground_truth(gt, subset, blocked)
        preds = load_predictions(pred, truth, subset, blocked=blocked)
    C = len(truth.classes)
    by_class = np.argsort(preds.label, kind="stable")  # file order within a class
    orders = [idx[np.argsort(preds.score[idx])[::-1]]  # the official order, ties included
              for idx in np.split(by_class, np.cumsum(np.bincount(preds.label, minlength=C))[:-1])]
    rank = np.empty(len(preds.score), np.int64)
    for order in orders:
        rank[order] = np.arange(len(order))
    tp = _match(truth, preds, rank, thresholds)  # (T, P)
    n_truth = np.bincount(truth.label, minlength=C)
    ap = np.stack([interpolated_ap(tp[:, o], n_truth[c]) for c, o in enumerate(orders)], axis=1)
    per_tiou = ap.mean(axis=1)  # (T,) mean over classes
    return per_tiou, float(per_tiou.mean())


def proposal_recall(gt, pred, subset="validation", blocked=()):
    """Class-agnostic AR at 1, 5, 10, 100 proposals a video and the AUC (%) of AR vs AN; `blocked` as above."""
    with _no_gc():
        truth = load_ground_truth(gt, subset, blocked)
        preds = load_predictions(pred, truth, subset, need_labels=False, blocked=blocked)
    videos = np.unique(truth.video)  # the official video list: videos with ground truth
    # Every video keeps the same fraction of its proposals, MAX_PROPOSALS a video on average.
    ratio = MAX_PROPOSALS * len(videos) / len(preds.score)
    by_video = np.argsort(preds.video, kind="stable")
    first = np.searchsorted(preds.video[by_video], np.arange(len(truth.videos)))
    count = np.bincount(preds.video[preds.video >= 0], minlength=len(truth.videos))
    kept = np.zeros(len(truth.videos), np.int64)
    kept[videos] = np.minimum((count[videos] * ratio).astype(np.int64), count[videos])
    ranked = [np.zeros(0, np.int64)] * len(truth.videos)
    for v in videos:
        idx = by_video[first[v]:first[v] + count[v]]
        ranked[v] = idx[np.argsort(preds.score[idx])[::-1]][:kept[v]]  # official order, ties too
    total = int(kept.sum())
    if total == 0:
        name = "predictions dict" if isinstance(pred, dict) else str(pred)
        raise ValueError(f"{name}: no proposal for a ground-truth video of subset {subset!r}")
    offset = np.cumsum(kept) - kept
    n = kept[truth.video]  # (N,) proposals a ground truth is compared with
    pair_gt = np.repeat(np.arange(len(n)), n)  # (K,)
    pos = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # (K,) rank of the proposal
    prop = np.concatenate(ranked)[offset[truth.video][pair_gt] + pos]
    iou = tiou(preds.segment[prop], truth.segment[pair_gt])  # (K,)
    t, k = np.nonzero(iou >= THRESHOLDS[:, None])
    lead = np.r_[True, (t[1:] != t[:-1]) | (pair_gt[k][1:] != pair_gt[k][:-1])][:len(t)]  # none may match
    hit = np.full((len(THRESHOLDS), len(n)), np.iinfo(np.int64).max)  # (T, N) first matching rank
    hit[t[lead], pair_gt[k[lead]]] = pos[k[lead]]
    pcn = np.arange(1, 101) / 100.0 * (MAX_PROPOSALS * len(videos) / total)  # fraction grid
    nr = np.minimum((kept[:, None] * pcn).astype(np.int64), kept[:, None])  # (V, 100)
    recall = (hit[:, :, None] < nr[truth.video][None]).sum(axis=1) / len(n)  # (T, 100)
    ar = recall.mean(axis=0)
    an = pcn * total / len(videos)  # average number of proposals a video: 1 .. 100
    auc = ((an[1:] - an[:-1]) * (ar[1:] + ar[:-1]) / 2.0).sum()  # np.trapz
    return {"AR@1": float(ar[0]), "AR@5": float(ar[4]), "AR@10": float(ar[9]),
            "AR@100": float(ar[99]), "AUC": float(100.0 * auc / an[-1])}


def run_metrics(gt, pred, out, subset="validation", blocked=()):
    """mAP at every tIoU threshold and their average, as a dict, also written as JSON to `out`, on the videos
    not `blocked`. No detection at all (a head that scores everything 0) is an average mAP of 0, not bad input."""
    results = json.loads(Path(pred).read_text())["results"]
    if any(found for vid, found in results.items() if normalise_id(vid) not in blocked):
        per_tiou, average = detection_map(gt, pred, subset=subset, blocked=blocked)
    else:
        print("warning: no detections for any video", flush=True)
        per_tiou, average = np.zeros(len(THRESHOLDS)), 0.0
    metrics = {f"mAP@{t:.2f}": float(m) for t, m in zip(THRESHOLDS, per_tiou)}
    metrics["average-mAP"] = float(average)
    Path(out).write_text(json.dumps(metrics, indent=1))
    return metrics


def draw_timeline(path, duration, dets, anno=None, vid="", width=1000, row=26):
    """A picture of one video: its ground truth in the annotation file `anno`, if any (green), above the top
    detections (blue, shade = score), on one time axis. dets: [{label, score, segment}] in seconds."""
    import cv2                                       # (only the picture needs OpenCV)
    entries = json.loads(Path(anno).read_text())["database"] if anno else {}
    truth = [a for k, e in entries.items() if normalise_id(k) == normalise_id(vid) for a in e.get("annotations", [])]
    rows = [("GT " + t["label"], t["segment"], 1.0, (60, 170, 60)) for t in truth] + \
           [(f"{d['label']} {d['score']:.2f}", d["segment"], d["score"], (200, 110, 40)) for d in dets]
    img = np.full((row * (len(rows) + 1) + 10, width, 3), 255, np.uint8)                # (H, W, 3) BGR
    x = lambda t: int(10 + (width - 20) * min(max(t / max(duration, 1e-6), 0.0), 1.0))
    cv2.line(img, (10, row // 2), (width - 10, row // 2), (0, 0, 0), 1)
    cv2.putText(img, f"0 s ... {duration:.1f} s", (12, row // 2 - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for i, (text, (t0, t1), score, colour) in enumerate(rows, start=1):
        y = row * i + 4
        shade = tuple(int(255 - (255 - c) * (0.3 + 0.7 * score)) for c in colour)
        cv2.rectangle(img, (x(t0), y), (max(x(t1), x(t0) + 1), y + row - 6), shade, -1)
        cv2.putText(img, text, (x(t0) + 3, y + row - 11), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.imwrite(str(path), img)


def main(argv=None):
    p = argparse.ArgumentParser(description="ActivityNet detection mAP / proposal AR@AN.")
    p.add_argument("--gt", required=True, help="annotation JSON, ActivityNet 'database' format")
    p.add_argument("--pred", required=True,
                   help="ActivityNet result JSON: 'results' -> id -> [{label, score, segment}]")
    p.add_argument("--subset", default="validation",
                   help="ground-truth subset; ActivityNet-1.3 test labels are hidden: validation")
    p.add_argument("--proposals", action="store_true",
                   help="evaluate class-agnostic proposals (AR@AN) instead of detections (mAP)")
    p.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    p.add_argument("--blocked", metavar="FILE", help="video ids, one a line, left out of the ground truth (OpenTAD, "
                   "BMN: the videos still available; default: all count, a missing one as missed, as officially)")
    args = p.parse_args(argv)
    try:
        blocked = read_blocked(args.blocked) if args.blocked else set()
        where = args.subset + (f" less {len(blocked)} blocked videos (not the official protocol)" if blocked else "")
        if args.proposals:
            result = proposal_recall(args.gt, args.pred, args.subset, blocked)
            lines = [f"proposals on {where}: {args.pred}", "AN     AR"]
            lines += [f"{k[3:]:<6} {result[k]:.4f}" for k in ("AR@1", "AR@5", "AR@10", "AR@100")]
            lines.append(" ".join(f"{k} {v:.4f}" for k, v in result.items()))
        else:
            per_tiou, average = detection_map(args.gt, args.pred, args.subset, blocked=blocked)
            result = {"tiou": THRESHOLDS.tolist(), "mAP": per_tiou.tolist(), "average_mAP": average}
            lines = [f"detection on {where}: {args.pred}", "tIoU   mAP"]
            lines += [f"{t:.2f}   {m:.4f}" for t, m in zip(THRESHOLDS, per_tiou)]
            lines.append(f"average-mAP {average:.6f}")
    except (ValueError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
