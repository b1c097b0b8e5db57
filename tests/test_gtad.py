"""Tests for gtad.py: the official parameter count, SGAlign against a scalar loop of spec §2.3,
fused == unfused, targets / loss / soft-NMS / decoding against hand cases and naive loops.

    python -m pytest -q tests/test_gtad.py
"""
import json
import math

import numpy as np
import pytest
import torch

import gtad


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: on a busy 2-core machine OpenMP hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------- independent references

def align_scalar(x, a, b, bins):
    """Align1D of one row x over the window [a, b], one sample at a time (spec §2.3)."""
    L = len(x)
    length = max(b - a, 1.0)
    delta, g = length / bins, math.ceil(length / bins)
    out, zone = [], {"inside": 0, "replicate": 0, "zero": 0}
    for p in range(bins):
        acc = 0.0
        for i in range(g):
            t = a + p * delta + (i + 0.5) * delta / g
            if t < -1 or t > L:
                zone["zero"] += 1
                continue
            zone["replicate" if (t < 0 or t > L - 1) else "inside"] += 1
            tau = min(max(t, 0.0), L - 1.0)
            lo = int(math.floor(tau))
            hi = min(lo + 1, L - 1)
            acc += (1 - (tau - lo)) * x[lo] + (tau - lo) * x[hi]
        out.append(acc / g)
    return out, zone


def window(d, s, L):
    return (s - (d + 1) / 2, s + d + (d + 1) / 2) if s + d <= L - 1 else (0.0, 0.0)


def tiou_bsn(a, b):
    """BSN's IOU: 0 unless overlapping, then intersection over the hull."""
    if b[0] > a[1] or a[0] > b[1]:
        return 0.0
    return (min(a[1], b[1]) - max(a[0], b[0])) / (max(a[1], b[1]) - min(a[0], b[0]))


def soft_nms_naive(segments, scores, sigma, top_k):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    segs = [tuple(segments[i]) for i in order]
    sc = [float(scores[i]) for i in order]
    kept_s, kept_c = [], []
    while segs and len(kept_s) < top_k and max(sc) > 0:
        m = sc.index(max(sc))
        for i in range(len(segs)):
            if i != m:
                iou = tiou_bsn(segs[m], segs[i])
                if iou > 0:
                    sc[i] *= math.exp(-iou ** 2 / sigma)
        kept_s.append(segs.pop(m))
        kept_c.append(sc.pop(m))
    return np.array(kept_s).reshape(-1, 2), np.array(kept_c)


def balanced_bce_spec(p, label):
    """Spec §3 literally: r = N/N_pos, w+ = r/2, w- = r/(2(r-1)), mean of the weighted sum."""
    b = [1.0 if y > 0.5 else 0.0 for y in label]
    r = len(b) / sum(b)
    wp, wn = r / 2, r / (2 * (r - 1))
    return -sum(wp * bi * math.log(pi + 1e-6) + wn * (1 - bi) * math.log(1 - pi + 1e-6)
                for pi, bi in zip(p, b)) / len(b)


# ---------------- architecture

def test_parameter_count_matches_official_anet():
    model = gtad.GTAD(gtad.GTADConfig(feat_dim=400))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == 5_563_268
    assert (count(model.backbone1), count(model.backbone2)) == (243_968, 166_912)
    assert (count(model.regu_s), count(model.regu_e), count(model.localization)) == (167_169, 167_169, 4_818_050)
    sd = model.state_dict()  # the official key names, so released weights load unchanged
    assert sd["localization.0.weight"].shape == (512, 9216, 1, 1)
    assert sd["backbone1.0.weight"].shape == (256, 100, 3)
    assert sd["backbone1.2.sconvs.0.weight"].shape == (128, 512, 1, 1)
    assert sd["regu_e.1.weight"].shape == (1, 256, 1)


def test_valid_mask():
    m = gtad.valid_mask(100)
    assert m.sum() == 5050 and m[99, 0] and not m[99, 1] and m[0, 99] and not m[1, 99]


# ---------------- SGAlign

@pytest.mark.parametrize("bins", [1, 2, 3, 5])
def test_align1d_matches_scalar_loop(bins):
    L = 7
    x = torch.randn(2, 3, L, dtype=torch.float64)
    out = gtad.align1d(x, bins)  # (B, C, P, L, L)
    assert out.shape == (2, 3, bins, L, L)
    zones = {"inside": 0, "replicate": 0, "zero": 0}
    ref = torch.zeros_like(out)
    for b in range(2):
        for c in range(3):
            for d in range(L):
                for s in range(L):
                    vals, zone = align_scalar(x[b, c].tolist(), *window(d, s, L), bins)
                    ref[b, c, :, d, s] = torch.tensor(vals, dtype=torch.float64)
                    zones = {k: zones[k] + zone[k] for k in zones}
    assert min(zones.values()) > 0  # windows run past both ends, into both boundary regimes
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_align1d_sanity_window():
    """x = 1..10 over [-0.5, 9.5] with 10 bins gives x back (spec §2.3)."""
    x = list(range(1, 11))
    assert align_scalar(x, -0.5, 9.5, 10)[0] == pytest.approx(x, abs=1e-12)
    w, p, t, v = gtad._window_weights(torch.tensor([-0.5]), torch.tensor([9.5]), 10, 10)
    dense = torch.zeros(10, 10, dtype=torch.float64).index_put_((p, t), v, accumulate=True)  # (P, L)
    torch.testing.assert_close(dense @ torch.arange(1.0, 11, dtype=torch.float64), torch.arange(1.0, 11, dtype=torch.float64))


def test_gcnext_and_context_against_loops():
    """The semantic graph and the SGAlign context, node by node: kNN by sorted distances, self included."""
    torch.manual_seed(1)
    model = gtad.GTAD(gtad.GTADConfig(feat_dim=64)).double()
    x = torch.randn(2, 64, 10, dtype=torch.float64)
    L = x.shape[-1]

    def nearest(f, i):  # f (C, L) -> the 3 nodes closest to node i
        return sorted(range(L), key=lambda j: ((f[:, i] - f[:, j]) ** 2).sum().item())[:3]

    block = model.backbone2[0]
    base = model.backbone1(x)  # (B, C, L)
    for b in range(2):
        f = base[b]  # (C, L)
        sem = torch.stack([
            block.sconvs(torch.stack([torch.cat([f[:, j], f[:, i]]) for j in nearest(f, i)], 1)[None, :, None])[0, :, 0].amax(-1)
            for i in range(L)], 1)  # (C, L)
        expected = torch.relu(f + block.tconvs(f[None])[0] + sem)
        torch.testing.assert_close(block(base)[b], expected, atol=1e-12, rtol=0)
    f_g = model.backbone2(base)
    context = torch.stack([torch.stack([f_g[b][:, nearest(f_g[b], i)].mean(1) for i in range(L)], 1)
                           for b in range(2)])  # (B, C, L)
    feat = torch.cat([gtad.align1d(f_g, 32), gtad.align1d(context, 4)], dim=2).flatten(1, 2)  # (B, 9216, L, L)
    maps = model.localization(feat)  # (B, 2, L, L)
    out = model(x)
    torch.testing.assert_close(out["reg"], maps[:, 0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out["cls"], maps[:, 1], atol=1e-12, rtol=0)
    torch.testing.assert_close(out["start"], model.regu_s(base)[:, 0], atol=1e-12, rtol=0)


def test_fused_equals_unfused():
    model = gtad.GTAD(gtad.GTADConfig(feat_dim=64))
    x = torch.randn(2, 64, 13)
    fused, plain = model(x), model(x, fused=False)
    for key in fused:
        assert (fused[key] - plain[key]).abs().max() < 1e-5
    # gradients in float64: in float32 a 1e-7 difference can flip a ReLU near 0 and move a whole row
    model.double()
    fused, plain = model(x.double()), model(x.double(), fused=False)
    assert max((fused[k] - plain[k]).abs().max().item() for k in fused) < 1e-12
    grads = []
    for out in (fused, plain):
        model.zero_grad()
        (out["reg"] * out["cls"]).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "localization.0.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("L", [25, 50, 100])
def test_forward_backward_any_length(L):
    torch.manual_seed(L)
    model = gtad.GTAD(gtad.GTADConfig(feat_dim=512))
    out = model(torch.randn(1, 512, L))
    assert out["start"].shape == (1, L) and out["reg"].shape == (1, L, L) and out["cls"].shape == (1, L, L)
    start, end, iou = gtad.targets(torch.tensor([[0.1, 0.35], [0.5, 0.9]]), L)
    terms = gtad.loss(out, start[None], end[None], iou[None])
    terms["total"].backward()
    assert all(torch.isfinite(v) for v in terms.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.localization[0].weight.grad.abs().sum() > 0


def test_bf16_autocast():
    model = gtad.GTAD(gtad.GTADConfig(feat_dim=64))
    x = torch.randn(2, 64, 16)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    start, end, iou = gtad.targets(torch.tensor([[0.2, 0.6]]), 16)
    terms = gtad.loss(out, start.expand(2, -1), end.expand(2, -1), iou.expand(2, -1, -1))
    terms["total"].backward()
    assert terms["total"].dtype == torch.float32 and torch.isfinite(terms["total"])
    assert (out["reg"].float() - ref["reg"]).abs().max() < 0.05


def test_bad_input_shape():
    with pytest.raises(ValueError, match="expects"):
        gtad.GTAD(gtad.GTADConfig(feat_dim=64))(torch.randn(1, 32, 10))


# ---------------- targets

def test_targets_spec_example_and_scaling():
    start, end, iou = gtad.targets(torch.tensor([[0.231, 0.5]]), 100)
    np.testing.assert_allclose(start[21:26], [0.45, 0.95, 1.0, 0.55, 0.05], atol=1e-6)
    assert start[:21].sum() == 0 and start[26:].sum() == 0
    np.testing.assert_allclose(end[47:52], [0.0, 0.5, 1.0, 1.0, 0.5], atol=1e-6)
    start, _, _ = gtad.targets(torch.tensor([[0.231, 0.5], [0.25, 0.6]]), 100)  # max over GTs
    assert start[24] == pytest.approx(1.0) and start[21] == pytest.approx(0.45)
    start, _, _ = gtad.targets(torch.tensor([[0.5, 0.7]]), 25)  # widths scale with 1/L
    np.testing.assert_allclose(start[10:15], [0.25, 0.75, 1.0, 0.75, 0.25], atol=1e-6)


def test_targets_iou_map():
    _, _, iou = gtad.targets(torch.tensor([[0.2, 0.5]]), 10)
    assert iou[2, 2] == pytest.approx(1.0)  # [0.2, 0.5]
    assert iou[0, 2] == pytest.approx(1 / 3)  # [0.2, 0.3]
    assert iou[9, 0] == pytest.approx(0.3)  # [0, 1]
    assert iou[9, 3] == pytest.approx(0.2 / 1.1)  # [0.3, 1.3], past the end, still computed
    assert iou[9, 5] == 0 and iou[0, 7] == 0
    start, end, iou = gtad.targets(torch.zeros(0, 2), 10)
    assert start.shape == (10,) and iou.shape == (10, 10) and start.sum() == end.sum() == iou.sum() == 0
    for bad in ([[0.5, 0.2]], [[-0.1, 0.3]], [[0.2, 1.2]]):
        with pytest.raises(ValueError, match="segments"):
            gtad.targets(torch.tensor(bad), 10)


# ---------------- loss

G = torch.tensor([[0.95, 0.8, 0.5, 0.2],  # rows d, columns s; s + d > 3 is invalid
                  [0.75, 0.4, 0.1, 0.9],
                  [0.2, 0.0, 0.99, 0.5],
                  [0.0, 0.6, 0.7, 0.8]])


def tiny_out():
    torch.manual_seed(3)
    reg, cls = torch.rand(1, 4, 4), torch.rand(1, 4, 4)
    cls[0, 2, 2] = 1 - 1e-7  # invalid cells must be ignored however wrong they are
    reg[0, 1, 3] = 0.0
    return dict(start=torch.tensor([[0.8, 0.3, 0.1, 0.6]]), end=torch.tensor([[0.2, 0.7, 0.4, 0.1]]),
                reg=reg, cls=cls)


def test_loss_terms_by_hand():
    out = tiny_out()
    start, end = torch.tensor([[0.6, 0.45, 0.5, 1.0]]), torch.tensor([[0.0, 0.51, 0.5, 0.2]])  # > 0.5 binarises
    terms = gtad.loss(out, start, end, G[None], generator=torch.Generator().manual_seed(0))
    # start: 1/2 mean(-log .8, -log .6) + 1/2 mean(-log .7, -log .9) = 0.29900
    assert balanced_bce_spec([0.8, 0.3, 0.1, 0.6], [0.6, 0.45, 0.5, 1.0]) == pytest.approx(0.29900, abs=1e-5)
    tem = balanced_bce_spec([0.8, 0.3, 0.1, 0.6], [0.6, 0.45, 0.5, 1.0]) + \
        balanced_bce_spec([0.2, 0.7, 0.4, 0.1], [0.0, 0.51, 0.5, 0.2])
    assert terms["tem"].item() == pytest.approx(tem, rel=1e-6)
    valid = [(d, s) for d in range(4) for s in range(4) if s + d <= 3]
    q, g = [out["cls"][0, d, s].item() for d, s in valid], [G[d, s].item() for d, s in valid]
    assert terms["cls"].item() == pytest.approx(balanced_bce_spec(q, [1.0 if v > 0.9 else 0.0 for v in g]), rel=1e-6)
    # N_H = 3 >= N_Md = 2 and N_Lo = 3: every cell with 0 < g on the valid triangle is kept
    sel = [(d, s) for d, s in valid if G[d, s] > 0]
    assert len(sel) == 8
    reg = 0.5 * sum((out["reg"][0, d, s].item() - G[d, s].item()) ** 2 for d, s in sel) / len(sel)
    assert terms["reg"].item() == pytest.approx(reg, rel=1e-6)
    assert terms["total"].item() == pytest.approx(tem + 10 * reg + terms["cls"].item(), rel=1e-6)


def test_loss_regression_sampling():
    g = torch.tensor([[0.8, 0.5, 0.6, 0.2],  # N_H = 1, N_Md = 4, N_Lo = 2 on the valid triangle
                      [0.4, 0.35, 0.1, 0.0],
                      [0.5, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0]])[None]
    out = tiny_out()
    zeros = torch.zeros(1, 4)
    for seed in range(5):
        terms = gtad.loss(out, zeros, zeros, g, generator=torch.Generator().manual_seed(seed))
        gen = torch.Generator().manual_seed(seed)  # the draw order documented in loss(): Md, then Lo
        u_mid, u_low = torch.rand(1, 4, 4, generator=gen), torch.rand(1, 4, 4, generator=gen)
        keep = [(d, s) for d in range(4) for s in range(4) if g[0, d, s] > 0.7
                or (0.3 < g[0, d, s] <= 0.7 and u_mid[0, d, s] < 1 / 4)
                or (0 < g[0, d, s] <= 0.3 and u_low[0, d, s] < 1 / 2)]
        reg = 0.5 * sum((out["reg"][0, d, s].item() - g[0, d, s].item()) ** 2 for d, s in keep) / len(keep)
        assert terms["reg"].item() == pytest.approx(reg, rel=1e-6)


def test_loss_edge_cases_stay_finite():
    out = tiny_out()
    zeros = torch.zeros(1, 4)
    terms = gtad.loss(out, zeros, zeros, torch.full((1, 4, 4), 0.5))  # no positives anywhere, no H
    assert terms["reg"] == 0 and all(torch.isfinite(v) for v in terms.values())
    neg_only = 0.5 * -np.mean(np.log(1 - np.array([0.8, 0.3, 0.1, 0.6]) + 1e-6))
    assert terms["tem"].item() == pytest.approx(neg_only + 0.5 * -np.mean(np.log(1 - np.array([0.2, 0.7, 0.4, 0.1]) + 1e-6)), rel=1e-6)
    terms = gtad.loss(out, torch.ones(1, 4), torch.ones(1, 4), torch.ones(1, 4, 4))  # no negatives
    assert all(torch.isfinite(v) for v in terms.values())


# ---------------- post-processing

@pytest.mark.parametrize("sigma,top_k", [(0.84, 100), (0.8, 10), (0.3, 40)])
def test_soft_nms_matches_naive_loop(sigma, top_k):
    rng = np.random.default_rng(1)
    start = rng.uniform(0, 0.8, 60)
    segments = np.stack([start, start + rng.uniform(0.01, 0.3, 60)], axis=1)
    scores = rng.uniform(0, 1, 60)
    got_s, got_c = gtad.soft_nms(segments, scores, sigma, top_k)
    ref_s, ref_c = soft_nms_naive(segments, scores, sigma, top_k)
    np.testing.assert_allclose(got_s, ref_s, rtol=0, atol=0)
    np.testing.assert_allclose(got_c, ref_c, rtol=1e-12)
    assert len(got_s) == min(top_k, 60)


def test_soft_nms_keeps_last_and_spares_touching():
    segs, scores = gtad.soft_nms([[0.0, 0.5], [0.5, 1.0]], [0.9, 0.4])
    np.testing.assert_array_equal(scores, [0.9, 0.4])  # touching: tIoU 0, no decay; both kept
    _, scores = gtad.soft_nms([[0.0, 0.4], [0.2, 0.6]], [0.9, 0.5], sigma=0.84)
    assert scores[1] == pytest.approx(0.5 * math.exp(-(0.2 / 0.6) ** 2 / 0.84))


def test_decode_hand_map():
    L, duration = 6, 12.0
    rng = np.random.default_rng(0)
    out = dict(start=torch.tensor([0.1, 0.2, 0.9, 0.8, 0.2, 0.1]),  # starts {0, 2 (peak), 3 (> max/2)}
               end=torch.tensor([0.5, 0.1, 0.3, 0.2, 0.6, 0.4]),  # ends {2 (peak below max/2), 4 (peak), 5}
               reg=torch.tensor(rng.uniform(0.1, 1, (L, L)), dtype=torch.float32),
               cls=torch.tensor(rng.uniform(0.1, 1, (L, L)), dtype=torch.float32))
    pairs = [(0, 2), (0, 4), (0, 5), (2, 4), (2, 5), (3, 4), (3, 5)]  # never e = L, never end 0 or start 5
    scores = [out["cls"][e - s - 1, s].item() * out["reg"][e - s - 1, s].item() for s, e in pairs]
    ref_s, ref_c = soft_nms_naive([(s / L, e / L) for s, e in pairs], scores, 0.84, 100)
    segments, got = gtad.decode(out, duration)
    assert segments.dtype == np.float64 and segments.shape == (7, 2)
    np.testing.assert_allclose(segments, ref_s * duration, atol=1e-12)
    np.testing.assert_allclose(got, ref_c, rtol=1e-6)
    segments, _ = gtad.decode(out, duration, top_k=2)
    assert len(segments) == 2


def test_assign_classes_and_video_scores(tmp_path):
    det = gtad.assign_classes(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.5, 0.2]),
                              np.array([0.1, 0.7, 0.2]), ["a", "b", "c"])
    assert [(d["label"], d["segment"]) for d in det] == [("b", [1.0, 2.0]), ("c", [1.0, 2.0]),
                                                        ("b", [3.0, 4.0]), ("c", [3.0, 4.0])]
    np.testing.assert_allclose([d["score"] for d in det], [0.35, 0.1, 0.14, 0.04])
    path = tmp_path / "cuhk.json"
    # 'v_' + an 11-character YouTube id loses the prefix; a real id that starts with 'v_' keeps it.
    path.write_text(json.dumps({"results": {"v_abcdefghijk": [0.1, 0.9], "v_UmAH95xls": [0.6, 0.4]},
                                "class": ["p", "q"]}))
    scores, names = gtad.read_video_scores(path)
    assert names == ["p", "q"] and sorted(scores) == ["abcdefghijk", "v_UmAH95xls"]
    np.testing.assert_array_equal(scores["abcdefghijk"], [0.1, 0.9])
    for bad, match in [({"results": {}}, "cuhk.json"), ({"results": {"v_a": [1.0]}, "class": ["p", "q"]}, "v_a"),
                       ({"results": {"v_abcdefghijk": [1, 0], "abcdefghijk": [0, 1]}, "class": ["p", "q"]}, "twice")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            gtad.read_video_scores(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="cuhk.json"):
        gtad.read_video_scores(path)
