"""Tests for evaluate.py: hand-computed AP and AR@AN cases, the official protocol written as a plain
per-prediction loop (checked to 1e-9 on real ActivityNet-1.3 annotations), the fast result-file
reader against json, bad input and the command line.

The loop below (`reference_map`, `reference_recall`) is the independent reference; the benchmark
script imports it, with `perturbed_predictions`, to time evaluate.py against it.
"""
import json
import subprocess
import sys
import warnings
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

import evaluate

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = np.linspace(0.5, 0.95, 10)


# ---------------------------------------------------------------- the official protocol as a loop

def _plain_id(vid):
    return vid[2:] if vid.startswith("v_") else vid


def _pair_iou(p, g):
    """tIoU of two [start, end] lists; two zero-length segments: 1 if they coincide, else 0."""
    inter = max(0.0, min(p[1], g[1]) - max(p[0], g[0]))
    union = (g[1] - g[0]) + (p[1] - p[0]) - inter
    if union > 0:
        return inter / union
    return 1.0 if p[0] == g[0] else 0.0


def _voc_ap(hits, n_truth):
    """VOC-2011 interpolated AP of a 0/1 sequence in score order, written out."""
    prec, rec, tp = [0.0], [0.0], 0
    for k, hit in enumerate(hits, 1):
        tp += hit
        prec.append(tp / k)
        rec.append(tp / n_truth)
    prec.append(0.0)
    rec.append(1.0)
    for i in range(len(prec) - 2, -1, -1):
        prec[i] = max(prec[i], prec[i + 1])
    return sum((rec[i] - rec[i - 1]) * prec[i] for i in range(1, len(rec)) if rec[i] != rec[i - 1])


def _truth_by_key(gt_doc, subset, key):
    truth, classes = defaultdict(list), []
    for vid, v in gt_doc["database"].items():
        if v["subset"] != subset:
            continue
        for a in v["annotations"]:
            if a["label"] not in classes:
                classes.append(a["label"])
            truth[key(a["label"], _plain_id(vid))].append([float(x) for x in a["segment"]])
    return truth, classes


def reference_map(gt_doc, pred_doc, subset="validation", thresholds=THRESHOLDS):
    """Official ANETdetection semantics, one prediction at a time (mAP per threshold)."""
    truth, classes = _truth_by_key(gt_doc, subset, lambda label, vid: (label, vid))
    by_label = defaultdict(list)  # label -> (video, score, segment) in file order
    for vid, items in pred_doc["results"].items():
        for p in items:
            by_label[p["label"]].append((_plain_id(vid), float(p["score"]), p["segment"]))
    ap = np.zeros((len(thresholds), len(classes)))
    for c, label in enumerate(classes):
        preds = by_label[label]
        taken = [set() for _ in thresholds]
        hits = np.zeros((len(thresholds), len(preds)), int)
        for i, j in enumerate(np.argsort(np.array([p[1] for p in preds], float))[::-1]):
            video, _, seg = preds[j]
            ious = np.array([_pair_iou(seg, g) for g in truth.get((label, video), [])])
            for t, thr in enumerate(thresholds):
                for g in np.argsort(ious)[::-1]:
                    if ious[g] < thr:
                        break
                    if (video, g) not in taken[t]:
                        taken[t].add((video, g))
                        hits[t, i] = 1
                        break
        n_truth = sum(len(s) for (lab, _), s in truth.items() if lab == label)
        for t in range(len(thresholds)):
            ap[t, c] = _voc_ap(hits[t], n_truth)
    return ap.mean(axis=1)


def reference_recall(gt_doc, pred_doc, subset="validation", max_avg=100):
    """Official eval_proposal semantics (AR on the 100-point grid, AUC in %), written out."""
    truth, _ = _truth_by_key(gt_doc, subset, lambda label, vid: vid)
    proposals = defaultdict(list)
    for vid, items in pred_doc["results"].items():
        proposals[_plain_id(vid)] += [(float(p["score"]), p["segment"]) for p in items]
    ratio = max_avg * len(truth) / sum(len(p) for p in proposals.values())
    kept = {}
    for vid in truth:
        items = proposals.get(vid, [])
        order = np.argsort(np.array([s for s, _ in items], float))[::-1]
        kept[vid] = [items[i][1] for i in order[:min(int(len(items) * ratio), len(items))]]
    total = sum(len(k) for k in kept.values())
    grid = np.arange(1, 101) / 100.0 * (max_avg * len(truth) / total)
    recall = np.zeros((len(THRESHOLDS), len(grid)))
    for vid, segments in truth.items():
        props = kept[vid]
        for g in segments:
            ious = [_pair_iou(p, g) for p in props]
            for t, thr in enumerate(THRESHOLDS):
                first = next((r for r, x in enumerate(ious) if x >= thr), None)
                for j, frac in enumerate(grid):
                    if first is not None and first < min(int(len(props) * frac), len(props)):
                        recall[t, j] += 1
    ar = recall.mean(axis=0) / sum(len(s) for s in truth.values())
    an = grid * total / len(truth)
    auc = sum((an[j] - an[j - 1]) * (ar[j] + ar[j - 1]) / 2 for j in range(1, len(an)))
    return {"AR@1": ar[0], "AR@5": ar[4], "AR@10": ar[9], "AR@100": ar[99],
            "AUC": 100 * auc / an[-1]}


def perturbed_predictions(gt_doc, per_video, seed, subset="validation", decimals=2, outside=()):
    """Predictions made from the ground truth: exact copies (10 %), jittered copies (50 %), random
    segments, 15 % wrong labels, scores rounded to `decimals` (many ties), every other id with
    'v_', and a few predictions for the videos in `outside` (not in the subset)."""
    rng = np.random.default_rng(seed)
    videos = {k: v for k, v in gt_doc["database"].items()
              if v["subset"] == subset and v["annotations"]}
    classes = sorted({a["label"] for v in videos.values() for a in v["annotations"]})
    results = {}
    for i, (vid, v) in enumerate(videos.items()):
        preds = []
        for _ in range(per_video):
            a = v["annotations"][rng.integers(len(v["annotations"]))]
            s, e = a["segment"]
            r, width = rng.random(), 0.15 * (e - s)
            if r < 0.1:
                seg = [s, e]
            elif r < 0.6:
                seg = sorted([s + rng.normal(0, 1) * width, e + rng.normal(0, 1) * width])
            else:
                seg = sorted(rng.uniform(0, v["duration"], 2).tolist())
            label = a["label"] if rng.random() < 0.85 else classes[rng.integers(len(classes))]
            score = round(float(rng.random()), decimals)
            preds.append({"label": label, "score": score, "segment": [float(x) for x in seg]})
        results[("v_" + vid) if i % 2 else vid] = preds
    for vid in outside:
        results[vid] = [{"label": classes[0], "score": 0.5, "segment": [1.0, 2.0]}] * 3
    return {"version": "VERSION 1.3", "results": results, "external_data": {"used": False}}


# ---------------------------------------------------------------- hand-computed cases

def gt_doc(*rows):
    """rows: (video, label, start, end), validation subset."""
    db = {}
    for vid, label, s, e in rows:
        db.setdefault(vid, {"subset": "validation", "duration": 100.0, "annotations": []})
        db[vid]["annotations"].append({"label": label, "segment": [s, e]})
    return {"version": "test", "database": db}


def pred_doc(*rows):
    """rows: (video, label, score, start, end), in file order."""
    results = {}
    for vid, label, score, s, e in rows:
        results.setdefault(vid, []).append({"label": label, "score": score, "segment": [s, e]})
    return {"version": "test", "results": results, "external_data": {}}


TWO_CLASSES = gt_doc(("a", "run", 0, 10), ("a", "jump", 20, 30), ("b", "run", 5, 15),
                     ("c", "jump", 0, 50))


def test_perfect_predictions_score_one():
    pred = pred_doc(("a", "run", 0.9, 0, 10), ("a", "jump", 0.8, 20, 30), ("b", "run", 0.7, 5, 15),
                    ("c", "jump", 0.6, 0, 50))
    per_tiou, average = evaluate.detection_map(TWO_CLASSES, pred)
    np.testing.assert_array_equal(per_tiou, np.ones(10))
    assert average == 1.0


def test_duplicate_prediction_is_a_false_positive():
    gt = gt_doc(("a", "run", 0, 10), ("a", "run", 40, 50))
    # in score order: TP, the duplicate (FP), TP -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    pred = pred_doc(("a", "run", 0.9, 0, 10), ("a", "run", 0.8, 0, 10), ("a", "run", 0.7, 40, 50))
    per_tiou, average = evaluate.detection_map(gt, pred)
    np.testing.assert_allclose(per_tiou, 0.5 * 1 + 0.5 * 2 / 3, rtol=0, atol=1e-12)


def test_shifted_prediction_crosses_a_threshold():
    gt = gt_doc(("a", "run", 0, 10))
    per_tiou, average = evaluate.detection_map(gt, pred_doc(("a", "run", 0.9, 2.2, 10)))  # 0.78
    np.testing.assert_array_equal(per_tiou, [1] * 6 + [0] * 4)
    assert average == pytest.approx(0.6, abs=1e-12)
    at_half = pred_doc(("a", "run", 0.9, 0, 5))  # tIoU exactly 0.5 counts: "at or above"
    assert evaluate.detection_map(gt, at_half, thresholds=[0.5])[1] == 1.0
    assert evaluate.detection_map(gt, at_half, thresholds=[0.5 + 1e-12])[1] == 0.0


@pytest.mark.parametrize("hit", [0, 3, 7, 12, 19, 26, 38])
def test_equal_scores_follow_numpy_argsort(hit):
    # 40 predictions in two videos, scores from {0.4, 0.5, 0.6}; only prediction `hit` is correct.
    # numpy's argsort is not stable, so its order of ties is neither file order nor its reverse.
    scores = np.random.default_rng(0).choice([0.4, 0.5, 0.6], 40)
    rows = [(("a", "b")[i // 20], "run", float(s), 60.0, 70.0) for i, s in enumerate(scores)]
    rows[hit] = rows[hit][:3] + (0.0, 10.0)
    gt = gt_doc(("a", "run", 0, 10), ("b", "run", 0, 10))
    rank = int(np.flatnonzero(np.argsort(scores)[::-1] == hit)[0])
    per_tiou, _ = evaluate.detection_map(gt, pred_doc(*rows))  # precision 1/(rank+1) at recall 1/2
    np.testing.assert_allclose(per_tiou, 0.5 / (rank + 1), rtol=0, atol=1e-12)


def test_equal_tious_follow_numpy_argsort():
    # The first prediction has tIoU 0.6 with both ground truths; the one it takes decides the rest.
    gt = gt_doc(("a", "run", 0, 6), ("a", "run", 4, 10))
    pred = pred_doc(("a", "run", 0.9, 0, 10), ("a", "run", 0.8, 0, 6), ("a", "run", 0.7, 4, 10))
    takes_second = np.argsort(np.array([0.6, 0.6]))[::-1][0] == 1
    low = 1.0 if takes_second else 0.5 + 0.5 * 2 / 3  # TP TP FP, or TP FP TP
    per_tiou, _ = evaluate.detection_map(gt, pred)
    np.testing.assert_allclose(per_tiou, [low] * 3 + [2 / 3] * 7, rtol=0, atol=1e-12)  # FP TP TP
    # five ground truths at the same tIoU 0.6, where numpy's sort is not stable: the loop decides
    gt5 = gt_doc(*[("a", "run", s, s + 6) for s in (0, 4, 1, 3, 2)])
    pred5 = pred_doc(("a", "run", 0.9, 0, 10),
                     *[("a", "run", 0.8 - s / 100, s, s + 6) for s in range(5)])
    np.testing.assert_allclose(evaluate.detection_map(gt5, pred5)[0], reference_map(gt5, pred5),
                               rtol=0, atol=1e-12)


def test_zero_length_segments():
    assert evaluate.tiou(np.array([5.0, 5.0]), np.array([5.0, 5.0])) == 1.0
    assert evaluate.tiou(np.array([5.0, 5.0]), np.array([7.0, 7.0])) == 0.0
    assert evaluate.tiou(np.array([5.0, 5.0]), np.array([0.0, 10.0])) == 0.0
    gt = gt_doc(("a", "run", 5, 5), ("a", "jump", 0, 10))
    pred = pred_doc(("a", "run", 0.9, 5, 5), ("a", "run", 0.8, 7, 7), ("a", "jump", 0.9, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 RuntimeWarning
        per_tiou, average = evaluate.detection_map(gt, pred)
    np.testing.assert_array_equal(per_tiou, np.full(10, 0.5))  # run: TP then FP -> 1; jump: FP -> 0


def test_other_video_and_missing_class():
    # "jump" predicted only in video b, where it has no ground truth: false positive before the hit.
    pred = pred_doc(("b", "jump", 0.95, 0, 50), ("a", "jump", 0.9, 20, 30),
                    ("a", "run", 0.9, 0, 10))
    per_tiou, _ = evaluate.detection_map(TWO_CLASSES, pred)
    # run: 1 of 2 found at precision 1 -> 0.5; jump: FP, TP, 1 of 2 -> 0.5 x 0.5
    np.testing.assert_allclose(per_tiou, (0.5 + 0.25) / 2, rtol=0, atol=1e-12)
    only_run = pred_doc(("a", "run", 0.9, 0, 10), ("b", "run", 0.9, 5, 15))
    per_tiou, _ = evaluate.detection_map(TWO_CLASSES, only_run)  # jump has no prediction: AP 0
    np.testing.assert_array_equal(per_tiou, np.full(10, 0.5))


def test_unknown_videos_warn_and_count_as_false_positives():
    pred = pred_doc(("zzz", "run", 0.99, 0, 10), ("zzz", "run", 0.98, 0, 10),
                    ("a", "run", 0.9, 0, 10), ("b", "run", 0.8, 5, 15))
    gt = gt_doc(("a", "run", 0, 10), ("b", "run", 5, 15), ("zzz", "run", 0, 10))
    gt["database"]["zzz"]["subset"] = "training"
    with pytest.warns(UserWarning, match=r"1 of 3 videos \(2 predictions\).*'zzz'"):
        per_tiou, _ = evaluate.detection_map(gt, pred)
    # FP FP TP TP: precision 1/3 then 2/4 at recall 1/2 and 1; the envelope is 1/2 at both
    np.testing.assert_allclose(per_tiou, 0.5, rtol=0, atol=1e-12)


def test_v_prefix_on_either_side():
    pred = pred_doc(("a", "run", 0.9, 0, 10), ("v_b", "run", 0.8, 5, 15), ("c", "jump", 0.7, 0, 50))
    plain = evaluate.detection_map(TWO_CLASSES, pred)[0]
    prefixed_gt = {"database": {"v_" + k: v for k, v in TWO_CLASSES["database"].items()}}
    np.testing.assert_array_equal(evaluate.detection_map(prefixed_gt, pred)[0], plain)
    assert plain[0] == pytest.approx(0.75)  # the v_b prediction matched: run 1.0, jump 0.5
    both = pred_doc(("a", "run", 0.9, 0, 10), ("v_a", "run", 0.8, 5, 15))
    with pytest.raises(ValueError, match="same video appears twice.*'a', 'v_a'"):
        evaluate.detection_map(TWO_CLASSES, both)


def test_recall_by_hand():
    # 3 videos x 100 proposals (all kept). Hits: a's [0, 10] at rank 4 (tIoU 1), b's [20, 30] at
    # rank 0 (tIoU 0.72: thresholds 0.50..0.70 only), c's [50, 60] at rank 28 (tIoU 1).
    filler = [(1000.0 + i, 1001.0 + i) for i in range(100)]
    rows = [(vid, "x", 1 - i / 100, *seg) for vid in "abc" for i, seg in enumerate(filler)]
    rows[4] = ("a", "x", 1 - 4 / 100, 0.0, 10.0)
    rows[100] = ("b", "x", 1.0, 20.0, 27.2)
    rows[228] = ("c", "x", 1 - 28 / 100, 50.0, 60.0)
    gt = gt_doc(("a", "run", 0, 10), ("b", "jump", 20, 30), ("c", "run", 50, 60))
    result = evaluate.proposal_recall(gt, pred_doc(*rows))
    # At AN = j a video shows its first int(100 * (j / 100)) proposals: that is j - 1 for j = 29,
    # so c counts from AN 30. AR(j) = (a + b + c) / 3 = 1/6 (j < 5), 1/2 (j < 30), 5/6.
    assert result["AR@1"] == pytest.approx(1 / 6, abs=1e-12)
    assert result["AR@5"] == pytest.approx(1 / 2, abs=1e-12)
    assert result["AR@10"] == pytest.approx(1 / 2, abs=1e-12)
    assert result["AR@100"] == pytest.approx(5 / 6, abs=1e-12)
    # trapezoids over AN 1..100: 3/6 + (1/6 + 1/2)/2 + 24/2 + (1/2 + 5/6)/2 + 70 * 5/6 = 431/6,
    # divided by AN 100 and given in %
    assert result["AUC"] == pytest.approx(431 / 6, abs=1e-9)


def test_recall_keeps_a_fraction_of_each_videos_proposals():
    # 300 + 100 proposals for 2 videos: each keeps half (100 a video on average), a 150 and b 50;
    # at AN 1, b shows int(50 x 1/100) = 0 proposals, so its hit at rank 1 only counts from AN 2.
    rows = [("a", "x", 1 - i / 1000, 1000.0 + i, 1001.0 + i) for i in range(300)]
    rows += [("b", "x", 1 - i / 1000, 1000.0 + i, 1001.0 + i) for i in range(100)]
    rows[0] = ("a", "x", 1.0, 0.0, 10.0)
    rows[300] = ("b", "x", 1.0, 20.0, 30.0)
    rows[299] = ("a", "x", 0.0, 40.0, 50.0)  # last in score order: beyond the kept 150
    gt = gt_doc(("a", "run", 0, 10), ("a", "run", 40, 50), ("b", "jump", 20, 30))
    result = evaluate.proposal_recall(gt, pred_doc(*rows))
    assert result["AR@1"] == pytest.approx(1 / 3, abs=1e-12)
    assert result["AR@100"] == pytest.approx(2 / 3, abs=1e-12)
    assert result == pytest.approx(reference_recall(gt, pred_doc(*rows)), abs=1e-12)


def test_recall_is_zero_when_no_proposal_overlaps():
    gt = gt_doc(("a", "run", 0, 1))
    pred = pred_doc(("a", "x", 0.9, 5, 6), ("a", "x", 0.8, 7, 8))
    result = evaluate.proposal_recall(gt, pred)
    assert result == pytest.approx({"AR@1": 0.0, "AR@5": 0.0, "AR@10": 0.0, "AR@100": 0.0, "AUC": 0.0})
    assert result == pytest.approx(reference_recall(gt, pred), abs=1e-12)


# ---------------------------------------------------------------- real ActivityNet-1.3 annotations

@lru_cache(maxsize=1)
def _real(path):
    return json.loads(Path(path).read_text())


def _first_videos(doc, n, subset="validation"):
    keep = [k for k, v in doc["database"].items() if v["subset"] == subset][:n]
    return {"version": doc["version"], "database": {k: doc["database"][k] for k in keep}}


def test_real_ground_truth_copied_scores_one(anet_annotations, tmp_path):
    doc = _real(anet_annotations)
    pred = {"results": {k: [{"label": a["label"], "score": 1.0, "segment": a["segment"]}
                            for a in v["annotations"]]
                        for k, v in doc["database"].items() if v["subset"] == "validation"}}
    path = tmp_path / "copy.json"
    path.write_text(json.dumps(pred))  # zero-length and duplicate ground truths included
    per_tiou, average = evaluate.detection_map(anet_annotations, path)
    np.testing.assert_allclose(per_tiou, np.ones(10), rtol=0, atol=1e-12)
    assert len(evaluate.load_ground_truth(anet_annotations).videos) == 4728


@pytest.mark.parametrize("videos, per_video, decimals", [(4728, 10, 2), (500, 100, 1)])
def test_real_perturbed_matches_the_official_loop(anet_annotations, tmp_path, videos, per_video,
                                                  decimals):
    # all validation videos with 10 predictions each, or 500 with 100 and scores on a 0.1 grid
    doc = _real(anet_annotations)
    gt = _first_videos(doc, videos)
    outside = [k for k, v in doc["database"].items() if v["subset"] == "training"][:2]
    pred = perturbed_predictions(gt, per_video, seed=videos, decimals=decimals, outside=outside)
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(pred))
    with pytest.warns(UserWarning, match=f"2 of {videos + 2} videos"):
        per_tiou, average = evaluate.detection_map(gt, path)
    expected = reference_map(gt, pred)
    np.testing.assert_allclose(per_tiou, expected, rtol=0, atol=1e-9)
    assert average == pytest.approx(expected.mean(), abs=1e-9)
    assert 0.2 < average < 0.9  # a perturbed set, neither empty nor perfect


def test_real_recall_matches_the_official_loop(anet_annotations):
    gt = _first_videos(_real(anet_annotations), 12)
    pred = perturbed_predictions(gt, per_video=160, seed=2)
    for vid in list(pred["results"])[::3]:  # uneven counts: some videos keep fewer than they have
        pred["results"][vid] = pred["results"][vid][:40]
    result = evaluate.proposal_recall(gt, pred)
    assert result == pytest.approx(reference_recall(gt, pred), abs=1e-9)
    assert 0 < result["AR@1"] < result["AR@100"] <= 1


# ---------------------------------------------------------------- the fast reader equals json

def _same_columns(a, b):
    """(ids, counts, label names, label codes, values): equal, floats bit for bit."""
    assert a[0] == b[0] and a[2] == b[2]
    for i in (1, 3, 4):
        np.testing.assert_array_equal(a[i], b[i])


def test_fast_reader_equals_json(anet_annotations, tmp_path):
    pred = perturbed_predictions(_first_videos(_real(anet_annotations), 200), per_video=20, seed=3)
    items = next(iter(pred["results"].values()))
    items[0]["score"], items[1]["score"], items[2]["segment"] = 1, 1.5e-7, [-0.0, 2e20]  # 1e-07
    columns = {}
    styles = {"default": {}, "compact": {"separators": (",", ":")}, "indented": {"indent": 1}}
    for name, kwargs in styles.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(pred, **kwargs))
        fast = evaluate._fast_columns(path.read_bytes())
        assert (fast is None) == (name == "indented")
        columns[name] = fast or evaluate._columns(json.loads(path.read_text()), name, True)
    _same_columns(columns["default"], columns["indented"])
    _same_columns(columns["compact"], columns["indented"])


def test_fast_reader_declines_what_it_cannot_prove():
    good = pred_doc(("a", "run", 0.9, 0, 10), ("a", "run", 0.7, 1, 2), ("b", "run", 0.8, 5, 15))
    text = json.dumps(good).encode()
    assert evaluate._fast_columns(text) is not None
    declined = [
        text.replace(b"}, {", b"} {"),  # no comma between predictions
        text.replace(b']}, "external_data"', b' }, "external_data"'),  # no closing bracket
        text.replace(b'"score": 0.9', b'"score": NaN'),  # not a JSON number
        text.replace(b'"score": 0.9', b'"score": 09'),  # leading zero: invalid JSON
        text.replace(b'"run"', b'"r\\u00fcn"', 1),  # an escape
        text.replace(b'], "b": [', b'], "a": ['),  # duplicate video key: json keeps the last
        text.replace(b'"external_data": {}', b'"external_data": {"results": 1}'),
        text.replace(b'"external_data": {}', b'"re\\u0073ults": {}'),  # a second "results"
        text.replace(b'"segment": [0, 10]', b'"segment": [0, 10, 20]'),
        text[:-1],  # truncated
    ]
    for bad in declined:
        assert evaluate._fast_columns(bad) is None, bad


def test_fast_reader_never_disagrees_with_json():
    # Random edits of a small file: whatever the fast reader accepts, json reads the same way.
    rng = np.random.default_rng(0)
    text = json.dumps(pred_doc(("a", "run", 0.5, 1.5, 2e-5), ("a", "jump", 1, 0, 10),
                               ("v_b", "run", -0.25, 3.25, 4))).encode()
    accepted = 0
    for _ in range(8000):
        i, j, k = np.sort(rng.integers(0, len(text) + 1, 3))
        edited = [text[:i] + text[j:k] + text[i:j] + text[k:],  # swap two pieces
                  text[:i] + text[j:],  # cut one
                  text[:k] + text[i:j] + text[k:]][rng.integers(3)]  # repeat one
        fast = evaluate._fast_columns(edited)
        if fast is not None:
            accepted += 1
            _same_columns(fast, evaluate._columns(json.loads(edited), "x", True))
    assert accepted > 80  # the test saw enough accepted edits


# ---------------------------------------------------------------- bad input

def _bad_cases():
    item = {"label": "run", "score": 0.9, "segment": [0, 10]}
    return {
        "label not in the ground truth": ({"results": {"a": [dict(item, label="swim")]}},
                                          r"video a, prediction 0: label 'swim' is not a ground"),
        "missing results": ({"version": "x"}, "no 'results' object"),
        "string score": ({"results": {"a": [item, dict(item, score="0.9")]}},
                         r"video a, prediction 1: expected a number, got '0.9'"),
        "boolean score": ({"results": {"a": [dict(item, score=True)]}},
                          "expected a number, got True"),
        "text in segment": ({"results": {"a": [dict(item, segment=["x", 10])]}},
                            "expected a number, got 'x'"),
        "three-number segment": ({"results": {"a": [dict(item, segment=[0, 1, 2])]}},
                                 r"video a, prediction 0: expected \{'label'"),
        "missing score": ({"results": {"a": [{"label": "run", "segment": [0, 10]}]}}, "expected"),
        "NaN score": ({"results": {"a": [dict(item, score=float("nan"))]}}, "not finite"),
        "reversed segment": ({"results": {"b": [dict(item, segment=[10, 0])]}},
                             r"video b, prediction 0: the segment ends before it starts"),
        "no predictions": ({"results": {"a": []}}, "no predictions"),
        "not a list": ({"results": {"a": item}}, "video a: expected a list"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_predictions_raise_the_same_from_file_and_dict(case, tmp_path):
    doc, message = _bad_cases()[case]
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as from_dict:
        evaluate.detection_map(TWO_CLASSES, doc)
    with pytest.raises(ValueError, match=message) as from_file:
        evaluate.detection_map(TWO_CLASSES, path)
    assert str(from_file.value) == str(from_dict.value).replace("predictions dict", str(path))


def test_bad_files_and_ground_truth(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match=f"{empty}: empty prediction file"):
        evaluate.detection_map(TWO_CLASSES, empty)
    broken = tmp_path / "broken.json"
    broken.write_text('{"results": {"a": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        evaluate.detection_map(TWO_CLASSES, broken)
    pred = pred_doc(("a", "run", 0.9, 0, 10))
    with pytest.raises(ValueError, match="no 'database' object"):
        evaluate.detection_map({"results": {}}, pred)
    with pytest.raises(ValueError, match="no video of subset 'testing'"):
        evaluate.detection_map(TWO_CLASSES, pred, subset="testing")
    bad_gt = gt_doc(("a", "run", "0", 10))
    with pytest.raises(ValueError, match="video a, annotation 0: expected a number, got '0'"):
        evaluate.detection_map(bad_gt, pred)
    with pytest.raises(ValueError, match="no proposal for a ground-truth video"), \
            pytest.warns(UserWarning, match="zzz"):
        evaluate.proposal_recall(TWO_CLASSES, pred_doc(("zzz", "x", 0.9, 0, 10)))


# ---------------------------------------------------------------- command line

def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_cli_detection_and_proposals(tmp_path):
    gt, pred, out = tmp_path / "gt.json", tmp_path / "pred.json", tmp_path / "out.json"
    gt.write_text(json.dumps(TWO_CLASSES))
    pred.write_text(json.dumps(pred_doc(("a", "run", 0.9, 0, 10), ("a", "jump", 0.8, 22.2, 30))))
    run = _cli("--gt", gt, "--pred", pred, "--json", out)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[1].split() == ["tIoU", "mAP"] and len(lines) == 13
    per_tiou, average = evaluate.detection_map(gt, pred)
    assert lines[-1] == f"average-mAP {average:.6f}"
    assert json.loads(out.read_text())["mAP"] == per_tiou.tolist()
    run = _cli("--gt", gt, "--pred", pred, "--proposals")
    assert run.returncode == 0, run.stderr
    recall = evaluate.proposal_recall(gt, pred)
    summary = " ".join(f"{k} {v:.4f}" for k, v in recall.items())
    assert run.stdout.strip().splitlines()[-1] == summary


def test_cli_bad_input_exits_2(tmp_path):
    gt, pred = tmp_path / "gt.json", tmp_path / "pred.json"
    gt.write_text(json.dumps(TWO_CLASSES))
    pred.write_text(json.dumps(pred_doc(("a", "swim", 0.9, 0, 10))))
    run = _cli("--gt", gt, "--pred", pred)
    assert run.returncode == 2 and run.stdout == ""
    assert "label 'swim' is not a ground-truth class" in run.stderr and "video a" in run.stderr
    run = _cli("--gt", gt, "--pred", tmp_path / "missing.json")
    assert run.returncode == 2 and "missing.json" in run.stderr


def test_blocked_videos_score_as_if_deleted_from_the_ground_truth(tmp_path):
    """--blocked (OpenTAD's and BMN's protocol: the videos still available) equals the ground truth and the
    predictions with those videos deleted by hand, by the naive loop too; our missing.txt and OpenTAD's
    missing_files.txt both work as the list, and the default (the official protocol) differs."""
    rows = [(f"vid{k}", ("run", "jump")[k % 2], 3.0 * k, 3.0 * k + 8) for k in range(8)]
    gt = gt_doc(*rows, ("vid1", "run", 40, 60), ("vid6", "jump", 70, 90))
    kept = {"database": {k: v for k, v in gt["database"].items() if k not in ("vid1", "vid6")}}
    for pred in (perturbed_predictions(gt, 6, seed=0), perturbed_predictions(kept, 6, seed=1)):
        (tmp_path / "pred.json").write_text(json.dumps(pred))
        for name, text in (("missing.txt", "vid1\tvalidation\nvid6\tvalidation\n"),
                           ("missing_files.txt", "v_vid6\nv_vid1.npy\n\n")):
            (tmp_path / name).write_text(text)
            blocked = evaluate.read_blocked(tmp_path / name)
            assert blocked == {"vid1", "vid6"}
            per_tiou, average = evaluate.detection_map(gt, pred, blocked=blocked)
            left = dict(pred, results={k: v for k, v in pred["results"].items() if k not in ("vid1", "v_vid1", "vid6")})
            by_hand = evaluate.detection_map(kept, left)
            assert np.array_equal(per_tiou, by_hand[0]) and average == by_hand[1]
            assert np.allclose(per_tiou, reference_map(kept, left), atol=1e-12)
            assert evaluate.proposal_recall(gt, pred, blocked=blocked) == evaluate.proposal_recall(kept, left)
            (tmp_path / "gt.json").write_text(json.dumps(gt))
            run = _cli("--gt", tmp_path / "gt.json", "--pred", tmp_path / "pred.json", "--blocked", tmp_path / name)
            assert run.returncode == 0 and run.stdout.splitlines()[-1] == f"average-mAP {by_hand[1]:.6f}", run.stderr
            assert "less 2 blocked videos (not the official protocol)" in run.stdout.splitlines()[0]
        assert evaluate.detection_map(gt, pred)[1] != average              # the official protocol: they count
