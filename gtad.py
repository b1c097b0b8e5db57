"""G-TAD, the temporal action localization head of LoFi, in plain PyTorch.

Paper: LoFi (Xu et al., NeurIPS 2021) Sec. 3.3 trains G-TAD (Xu et al., CVPR 2020) end to end with
the video encoder at any temporal scale L. Contract: ../shared/spec/gtad.md (section numbers below).

- GCNeXt (spec §2.2): a temporal graph (grouped conv over neighbours in time) plus a semantic graph
  (edge convolution over the k = 3 nearest snippets in feature space, self included).
- SGAlign (spec §2.3, "Algorithm 1"): every cell (d, s) of the L x L anchor map samples 32 inner and
  4 context bins from its window by 1-D linear interpolation. The sampling is linear in the features
  and fixed per L, so it is a sparse matrix, built once per (L, device, dtype) and cached; no CUDA op.
- Fused SGAlign + first 1x1 conv (spec §7): that conv is linear too, so it is applied to every
  snippet before sampling and the (B, 36 C, L, L) map is never built. Parameter names and shapes are
  those of the official `anet` model, so its weights load unchanged (5,563,268 at feat_dim 400).
- targets, loss (spec §1.4-1.5, §3), decoding, soft-NMS and class assignment (spec §5, §11).

Library module, no command line: lofi.py builds GTAD(GTADConfig(feat_dim=encoder.dim)).
    python -m pytest -q tests/test_gtad.py      # the checks against naive loops and hand cases

Fused vs unfused, one forward + backward (model + loss) at B = 4, L = 100, feat 512, fp32:
peak memory 278 MB vs 4,418 MB and 0.88 s vs 16.3 s on a 2-core CPU (torch 2.14);
339 MB vs 4,400 MB and 38 ms vs 44 ms on one H200 (torch 2.11).
"""
import contextlib
import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6  # inside the logs of the balanced BCE, as in the original


@dataclass
class GTADConfig:
    feat_dim: int = 512        # snippet feature width: 512 TSM-R18, 2048 TSM-R50, 400 original TSN
    h_dim: int = 256           # width of the 1-D graph features (h_dim_1d)
    h_dim_2d: int = 128        # width of the last localisation convs
    h_dim_3d: int = 512        # output width of the first (fused) localisation conv
    k: int = 3                 # kNN neighbours of the semantic graph, the node itself included
    groups: int = 32           # GCNeXt cardinality
    width_group: int = 4       # channels per group, so the GCNeXt bottleneck is 128 wide
    input_groups: int = 4      # groups of the first Conv1d feat_dim -> h_dim
    inner_bins: int = 32       # SGAlign bins over the window
    ctx_bins: int = 4          # SGAlign bins over the kNN-context features


def valid_mask(L, device=None):
    """M[d, s] = s + d <= L - 1: the anchors that end inside the video (spec §1.3)."""
    d = torch.arange(L, device=device)[:, None]  # (L, 1)
    s = torch.arange(L, device=device)[None, :]  # (1, L)
    return s + d <= L - 1  # (L, L)


# ---------------- GCNeXt (spec §2.2)

def knn(x, k):
    """Indices of the k nearest nodes by Euclidean distance, the node itself first."""
    with torch.autocast(x.device.type, enabled=False):  # bf16 distances would pick other neighbours
        x = x.float()
        sq = (x * x).sum(1)  # (B, L)
        neg_dist = 2 * x.transpose(1, 2) @ x - sq[:, :, None] - sq[:, None, :]  # (B, L, L)
    return neg_dist.topk(k, dim=-1).indices  # (B, L, k)


def neighbours(x, idx):
    """Gather the features of the kNN nodes: x (B, C, L), idx (B, L, k) -> (B, C, L, k)."""
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]  # (B, 1, 1)
    return x.transpose(1, 2)[batch, idx].permute(0, 3, 1, 2)  # (B, C, L, k)


class GCNeXt(nn.Module):
    """out = ReLU(x + T(x) + S(x)); attribute names follow the official code (tconvs, sconvs)."""

    def __init__(self, ch, k, groups, width_group):
        super().__init__()
        self.k = k
        w = groups * width_group
        self.tconvs = nn.Sequential(  # temporal graph: each node and its two neighbours in time
            nn.Conv1d(ch, w, 1), nn.ReLU(),
            nn.Conv1d(w, w, 3, padding=1, groups=groups), nn.ReLU(),
            nn.Conv1d(w, ch, 1))
        self.sconvs = nn.Sequential(  # semantic graph: edge MLP over the kNN edges
            nn.Conv2d(2 * ch, w, 1), nn.ReLU(),
            nn.Conv2d(w, w, 1, groups=groups), nn.ReLU(),
            nn.Conv2d(w, ch, 1))

    def forward(self, x):  # (B, C, L)
        nb = neighbours(x, knn(x, self.k))  # (B, C, L, k)
        # the edge feature is [x_j, x_i], the raw neighbour and not DGCNN's x_j - x_i (spec §2.2)
        edge = torch.cat([nb, x.unsqueeze(-1).expand_as(nb)], dim=1)  # (B, 2C, L, k)
        semantic = self.sconvs(edge).amax(-1)  # (B, C, L)
        return F.relu(x + self.tconvs(x) + semantic)  # (B, C, L)


# ---------------- SGAlign (spec §2.3)

def _window_weights(a, b, L, bins):
    """Align1D of windows [a, b] over L snippets as sparse entries (window, bin, t, weight).

    Per bin, g = ceil(max(b - a, 1) / bins) samples at a + (p + (i + 1/2) / g) * delta; each sample
    interpolates x between floor(tau) and the next index, tau = t clamped to [0, L-1], so the edge
    value is replicated within one unit outside the video and samples beyond count as zero in the
    1/g average. Computed in float64 on the CPU, once per L.
    """
    length = (b - a).clamp(min=1)  # (A,)
    delta = length / bins
    g = torch.ceil(length / bins)  # (A,) adaptive number of samples per bin (goi_samp = 0)
    p = torch.arange(bins, dtype=torch.float64)[None, :, None]  # (1, P, 1)
    i = torch.arange(int(g.max()), dtype=torch.float64)[None, None, :]  # (1, 1, G)
    a, delta, g = a[:, None, None], delta[:, None, None], g[:, None, None]  # (A, 1, 1)
    t = a + p * delta + (i + 0.5) * delta / g  # (A, P, G) sample positions
    keep = (i < g) & (t >= -1) & (t <= L)  # (A, P, G)
    tau = t.clamp(0, L - 1)
    lo = tau.floor()
    hi = (lo + 1).clamp(max=L - 1)
    w = tau - lo  # (A, P, G) interpolation weight of the upper index
    window = torch.arange(len(length))[:, None, None].expand(t.shape)[keep]  # (S,)
    bin_ = torch.arange(bins)[None, :, None].expand(t.shape)[keep]  # (S,)
    g = g.expand(t.shape)[keep]
    idx_w, idx_p = torch.cat([window, window]), torch.cat([bin_, bin_])  # (2S,)
    idx_t = torch.cat([lo[keep], hi[keep]]).long()  # (2S,)
    value = torch.cat([(1 - w[keep]) / g, w[keep] / g])  # (2S,)
    nz = value != 0
    return idx_w[nz], idx_p[nz], idx_t[nz], value[nz]


def _cell_weights(L, bins):
    """Sparse Align1D entries for every cell (d, s), cell index d * L + s (spec §2.3)."""
    d = torch.arange(L, dtype=torch.float64)[:, None].expand(L, L).flatten()  # (L*L,)
    s = torch.arange(L, dtype=torch.float64)[None, :].expand(L, L).flatten()  # (L*L,)
    valid = s + d <= L - 1
    # proposal [s - 1/2, s + d + 1/2] grown by half its length d + 1 on each side (expand_ratio 0.5);
    # anchors past the end get a = b = 0: their outputs are garbage and always masked out
    a = torch.where(valid, s - (d + 1) / 2, 0.0)  # (L*L,)
    b = torch.where(valid, s + d + (d + 1) / 2, 0.0)  # (L*L,)
    return _window_weights(a, b, L, bins)


def _sparse(idx_rows, idx_cols, value, shape, device, dtype):
    with torch.sparse.check_sparse_tensor_invariants():  # opted in explicitly: checked once per L, no warning
        m = torch.sparse_coo_tensor(torch.stack([idx_rows, idx_cols]), value, shape)
        return m.coalesce().to(device=device, dtype=dtype)


@lru_cache(maxsize=8)
def _align_matrix(L, bins, device, dtype):
    """Sparse (bins * L * L, L): row p * L * L + cell samples bin p of that cell."""
    cell, p, t, value = _cell_weights(L, bins)
    return _sparse(p * L * L + cell, t, value, (bins * L * L, L), device, dtype)


@lru_cache(maxsize=8)
def _fused_matrix(L, inner_bins, ctx_bins, device, dtype):
    """Sparse (L * L, (inner_bins + ctx_bins) * L): row = cell, column p * L + t, both bin sets."""
    cell_i, p_i, t_i, v_i = _cell_weights(L, inner_bins)
    cell_c, p_c, t_c, v_c = _cell_weights(L, ctx_bins)
    rows = torch.cat([cell_i, cell_c])
    cols = torch.cat([p_i * L + t_i, (p_c + inner_bins) * L + t_c])
    shape = (L * L, (inner_bins + ctx_bins) * L)
    return _sparse(rows, cols, torch.cat([v_i, v_c]), shape, device, dtype)


def _dtype(x):
    """The sampling runs in at least float32: autocast has no sparse kernels."""
    return torch.promote_types(x.dtype, torch.float32)


def _sparse_mm(matrix, dense):
    with torch.autocast(device_type=dense.device.type, enabled=False):
        return torch.sparse.mm(matrix, dense.to(matrix.dtype))


def align1d(x, bins):
    """Unfused SGAlign sampling (the reference path): x (B, C, L) -> (B, C, bins, L, L), cells [d, s]."""
    B, C, L = x.shape
    out = _sparse_mm(_align_matrix(L, bins, x.device, _dtype(x)), x.reshape(B * C, L).t())  # (P L L, B C)
    return out.t().reshape(B, C, bins, L, L)  # (B, C, P, L, L)


# ---------------- the model (spec §2.1)

class GTAD(nn.Module):
    """forward(x (B, feat_dim, L)) -> dict(start (B, L), end (B, L), reg (B, L, L), cls (B, L, L)).

    Maps are indexed [d, s], cell (d, s) = segment [s/L, (s+d+1)/L]. Any L >= k works with one set of
    weights. Module names (backbone1, backbone2, regu_s, regu_e, localization) are the official ones.
    forward(x, fused=False) runs the original, memory-hungry data flow: the reference for tests.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        h, h2, h3 = cfg.h_dim, cfg.h_dim_2d, cfg.h_dim_3d

        def gcnext():
            return GCNeXt(h, cfg.k, cfg.groups, cfg.width_group)

        self.backbone1 = nn.Sequential(
            nn.Conv1d(cfg.feat_dim, h, 3, padding=1, groups=cfg.input_groups), nn.ReLU(), gcnext())
        self.backbone2 = nn.Sequential(gcnext())
        self.regu_s = nn.Sequential(gcnext(), nn.Conv1d(h, 1, 1), nn.Sigmoid())  # start head
        self.regu_e = nn.Sequential(gcnext(), nn.Conv1d(h, 1, 1), nn.Sigmoid())  # end head
        # every localisation conv is 1x1 (kern_2d = 1): a per-cell MLP; channel 0 = reg, 1 = cls
        self.localization = nn.Sequential(
            nn.Conv2d(h * (cfg.inner_bins + cfg.ctx_bins), h3, 1), nn.ReLU(),
            nn.Conv2d(h3, h2, 1), nn.ReLU(),
            nn.Conv2d(h2, h2, 1), nn.ReLU(),
            nn.Conv2d(h2, h2, 1), nn.ReLU(),
            nn.Conv2d(h2, 2, 1), nn.Sigmoid())

    def forward(self, x, fused=True):  # (B, feat_dim, L)
        if x.dim() != 3 or x.shape[1] != self.cfg.feat_dim or x.shape[2] < self.cfg.k:
            raise ValueError(f"G-TAD expects (B, {self.cfg.feat_dim}, L >= {self.cfg.k}), got {tuple(x.shape)}")
        base = self.backbone1(x)  # (B, C, L) F_base
        f_g = self.backbone2(base)  # (B, C, L) F_g
        start = self.regu_s(base).squeeze(1)  # (B, L)
        end = self.regu_e(base).squeeze(1)  # (B, L)
        # context: the mean over each node's kNN (recomputed on F_g), aligned over the same window
        context = neighbours(f_g, knn(f_g, self.cfg.k)).mean(-1)  # (B, C, L)
        maps = self._fused(f_g, context) if fused else self._unfused(f_g, context)  # (B, 2, L, L)
        return dict(start=start, end=end, reg=maps[:, 0], cls=maps[:, 1])

    def _unfused(self, f_g, context):
        """The original data flow: build the (B, 36 C, L, L) map, then the 1x1 convs."""
        cfg = self.cfg
        feat = torch.cat([align1d(f_g, cfg.inner_bins), align1d(context, cfg.ctx_bins)], dim=2)  # (B, C, 36, L, L)
        return self.localization(feat.flatten(1, 2))  # (B, 2, L, L), channel-major c * 36 + p

    def _fused(self, f_g, context):
        """Spec §7: apply the first 1x1 conv per snippet and bin, then sample; same numbers, no big map."""
        cfg = self.cfg
        B, C, L = f_g.shape
        conv = self.localization[0]
        weight = conv.weight.view(conv.out_channels, C, cfg.inner_bins + cfg.ctx_bins)  # (O, C, 36)
        y_inner = torch.einsum("ocp,bct->ptbo", weight[:, :, :cfg.inner_bins], f_g)  # (32, L, B, O)
        y_ctx = torch.einsum("ocp,bct->ptbo", weight[:, :, cfg.inner_bins:], context)  # (4, L, B, O)
        y = torch.cat([y_inner, y_ctx]).reshape(-1, B * conv.out_channels)  # (36 L, B O)
        matrix = _fused_matrix(L, cfg.inner_bins, cfg.ctx_bins, y.device, _dtype(y))  # (L L, 36 L) sparse
        h = _sparse_mm(matrix, y)  # (L L, B O)
        h = h.view(L, L, B, -1) + conv.bias  # (L, L, B, O) cells [d, s], channels last
        for layer in self.localization[1:]:  # the remaining 1x1 convs as linear maps per cell
            h = F.linear(h, layer.weight.flatten(1), layer.bias) if isinstance(layer, nn.Conv2d) else layer(h)
        return h.permute(2, 3, 0, 1)  # (B, 2, L, L)


# ---------------- targets (spec §1.4-1.5)

def targets(segments, L):
    """Soft start/end labels (L,) and the IoU map (L, L) of GT segments (N, 2) normalised to [0, 1].

    Position j owns [(j - 0.5)/L, (j + 1.5)/L]; a boundary region is 3/L wide, centred on the GT
    boundary; a label is the IoA of the position with the region, max over GTs (BMN's convention).
    The IoU map covers all L x L cells, also those that end past 1.0; the loss masks them.
    """
    seg = torch.as_tensor(segments, dtype=torch.float64).reshape(-1, 2)  # (N, 2)
    if len(seg) == 0:
        return torch.zeros(L), torch.zeros(L), torch.zeros(L, L)
    if ((seg < 0).any() or (seg > 1).any() or (seg[:, 1] < seg[:, 0]).any()):
        raise ValueError(f"segments must lie in [0, 1] with start <= end, got {seg.tolist()}")
    j = torch.arange(L, dtype=torch.float64)[:, None]  # (L, 1)
    own_lo, own_hi = (j - 0.5) / L, (j + 1.5) / L  # (L, 1)

    def ioa(boundary):  # (N,) -> (L,)
        inter = (torch.minimum(own_hi, boundary + 1.5 / L) - torch.maximum(own_lo, boundary - 1.5 / L)).clamp(min=0)
        return (inter / (2 / L)).amax(1)  # (L,)

    d = torch.arange(L, dtype=torch.float64)[:, None, None]  # (L, 1, 1)
    s = torch.arange(L, dtype=torch.float64)[None, :, None]  # (1, L, 1)
    x0, x1 = s / L, (s + d + 1) / L  # (L, L, 1) cell (d, s) = [s/L, (s+d+1)/L]
    g0, g1 = seg[:, 0], seg[:, 1]  # (N,)
    inter = (torch.minimum(x1, g1) - torch.maximum(x0, g0)).clamp(min=0)  # (L, L, N)
    iou = (inter / ((x1 - x0) + (g1 - g0) - inter)).amax(-1)  # (L, L)
    return ioa(seg[:, 0]).float(), ioa(seg[:, 1]).float(), iou.float()


# ---------------- loss (spec §3)

def batch_targets(segments, L, device):
    """G-TAD labels for each video of a batch at this batch's temporal scale L."""
    start, end, iou = zip(*(targets(s, L) for s in segments))
    return torch.stack(start).to(device), torch.stack(end).to(device), torch.stack(iou).to(device)


def _balanced_bce(p, positive):
    """1/2 mean over positives of -log(p) + 1/2 mean over negatives of -log(1 - p).

    Equal to the original's r = N/N_pos weighting; an empty side contributes 0 instead of NaN.
    """
    pos = positive.float()
    loss_pos = -(torch.log(p + EPS) * pos).sum() / pos.sum().clamp(min=1)
    loss_neg = -(torch.log(1 - p + EPS) * (1 - pos)).sum() / (1 - pos).sum().clamp(min=1)
    return 0.5 * (loss_pos + loss_neg)


def loss_generator(seed, epoch, step, rank, device):
    """The seeded RNG of loss()'s sampled regression terms: the same draws on resume and on every world size."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1, np.uint64)[0] >> 1))
    return g


def loss(out, start, end, iou, generator=None):
    """L = L_tem + 10 L_reg + L_cls over the whole batch. start/end (B, L), iou (B, L, L) from targets().

    L_reg keeps every cell with IoU > 0.7 (H), each cell of Md (0.3, 0.7] with probability N_H/N_Md
    and each cell of Lo (0, 0.3] with probability N_H/N_Lo: one torch.rand draw per cell, for Md
    first, then for Lo, from `generator` (seedable, unlike the original's numpy draws). Edge cases, chosen to stay finite: N_H >= N_Md keeps all of Md (the original then
    selects every cell, invalid ones included), no selected cell gives L_reg = 0, and an empty
    positive or negative side of a balanced BCE contributes 0.
    """
    p_s, p_e = out["start"].float(), out["end"].float()  # (B, L) sigmoid outputs may be bf16 under autocast
    reg, cls = out["reg"].float(), out["cls"].float()  # (B, L, L)
    mask = valid_mask(reg.shape[-1], reg.device)  # (L, L)
    g = iou.to(reg.device, torch.float32) * mask  # (B, L, L)

    tem = _balanced_bce(p_s, start > 0.5) + _balanced_bce(p_e, end > 0.5)  # labels binarised at 0.5
    cls_loss = _balanced_bce(cls[:, mask], g[:, mask] > 0.9)  # valid cells only

    high, mid, low = g > 0.7, (g > 0.3) & (g <= 0.7), (g > 0) & (g <= 0.3)  # g = 0 never enters L_reg
    n_h = high.sum()
    u_mid = torch.rand(g.shape, generator=generator, device=g.device)  # (B, L, L)
    u_low = torch.rand(g.shape, generator=generator, device=g.device)
    keep = high | (mid & (u_mid < n_h / mid.sum().clamp(min=1))) | (low & (u_low < n_h / low.sum().clamp(min=1)))
    w = keep.float()
    reg_loss = 0.5 * (w * (reg - g) ** 2).sum() / w.sum().clamp(min=1)

    total = tem + 10 * reg_loss + cls_loss
    return dict(tem=tem, reg=reg_loss, cls=cls_loss, total=total)


# ---------------- decoding (spec §5)

def video_memory(cfg, L, device, amp, measure):
    """(bytes per video, fixed bytes) a training step of the head holds at scale L: the marginal cost of a
    video (1 and 2 videos of random features), and the weights and gradients. measure(fn, params, device,
    amp) -> the bytes one forward + backward of fn() holds (tsm.step_memory)."""
    head = GTAD(cfg).to(device).train()
    labels = batch_targets([torch.tensor([[0.2, 0.5], [0.6, 0.9]])], L, device)

    def step(b):
        feats = torch.randn(b, cfg.feat_dim, L, device=device, requires_grad=True)             # (b, D, L)
        return lambda: loss(head(feats), *(t.expand(b, *t.shape[1:]) for t in labels))["total"]
    m1, m2 = (measure(step(b), [*head.parameters()], device, amp) for b in (1, 2))
    return m2 - m1, 2 * sum(p.numel() * p.element_size() for p in head.parameters()) + max(0.0, 2 * m1 - m2)


def _boundaries(p):
    """Candidate positions 1..L-2: strict local maxima or above half the maximum (BMN's rule)."""
    c = np.zeros(len(p), dtype=bool)
    c[1:-1] = ((p[1:-1] > p[:-2]) & (p[1:-1] > p[2:])) | (p[1:-1] > 0.5 * p.max())
    return c


def decode(out_one, duration, sigma=0.84, top_k=100):
    """One video's maps -> (segments (K, 2) in seconds float64, scores (K,)) after soft-NMS.

    Proposal [s/L, e/L], e = s + d + 1 < L (never ending at 1.0), s a start candidate (position 0
    always), e an end candidate (position L-1 always); score = cls[d, s] * reg[d, s] (spec §5).
    """
    def np64(t):
        return t.detach().float().cpu().numpy().astype(np.float64)

    p_s, p_e, reg, cls = (np64(out_one[k]) for k in ("start", "end", "reg", "cls"))
    L = len(p_s)
    starts, ends = _boundaries(p_s), _boundaries(p_e)
    starts[0], ends[L - 1] = True, True
    d, s = np.meshgrid(np.arange(L), np.arange(L), indexing="ij")  # (L, L) cells [d, s]
    e = s + d + 1
    keep = (e < L) & starts[s] & ends[np.minimum(e, L - 1)]
    segments = np.stack([s[keep], e[keep]], axis=1) / L  # (K, 2) normalised
    segments, scores = soft_nms(segments, cls[keep] * reg[keep], sigma, top_k)
    return np.clip(segments, 0, 1) * duration, scores


def soft_nms(segments, scores, sigma=0.84, top_k=100):
    """Gaussian soft-NMS: take the best, then score <- score * exp(-tIoU^2 / sigma) for every other
    proposal with tIoU > 0 with it; repeat until top_k are kept or no score is > 0.

    sigma is the whole denominator (G-TAD's anet code uses 0.8 there); the default 0.84 is LoFi's
    "soft-NMS with a threshold of 0.84". Unlike the BSN/G-TAD loop, the last candidate is kept too.
    Returns (segments (K, 2), scores (K,)) in the order they were kept, scores as decayed.
    """
    seg = np.asarray(segments, dtype=np.float64).reshape(-1, 2)  # (N, 2)
    score = np.asarray(scores, dtype=np.float64).copy()  # (N,)
    order = np.argsort(-score, kind="stable")
    seg, score = seg[order], score[order]
    alive = np.ones(len(score), dtype=bool)
    kept = []
    while len(kept) < top_k and alive.any():
        best = int(np.argmax(np.where(alive, score, -np.inf)))
        if score[best] <= 0:
            break
        kept.append(best)
        alive[best] = False
        inter = np.clip(np.minimum(seg[:, 1], seg[best, 1]) - np.maximum(seg[:, 0], seg[best, 0]), 0, None)
        union = (seg[:, 1] - seg[:, 0]) + (seg[best, 1] - seg[best, 0]) - inter
        tiou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)  # (N,)
        decay = alive & (tiou > 0)
        score[decay] *= np.exp(-tiou[decay] ** 2 / sigma)
    return seg[kept], score[kept]


def assign_classes(segments, scores, class_scores, class_names, top=2):
    """Class-agnostic proposals x the video's top classes -> ActivityNet result entries (spec §5.6).

    Each proposal is output once per top class with score = proposal score * class score, so up to
    top * K detections; ordered by proposal, then class rank.
    """
    class_scores = np.asarray(class_scores, dtype=np.float64)
    if len(class_scores) != len(class_names):
        raise ValueError(f"{len(class_scores)} class scores for {len(class_names)} class names")
    best = np.argsort(-class_scores, kind="stable")[:top]
    return [{"label": class_names[c], "score": float(p * class_scores[c]), "segment": [float(t0), float(t1)]}
            for (t0, t1), p in zip(np.asarray(segments), np.asarray(scores)) for c in best]


def read_video_scores(path):
    """Video-level class scores in the CUHK format {"results": {id: [scores]}, "class": [names]}.

    Returns (dict id -> numpy (K,), class names); ids are stored without a "v_" prefix.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        names, results = list(data["class"]), dict(data["results"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a CUHK video-score file ({{'results', 'class'}}): {err!r}") from err
    scores = {}
    for vid, row in results.items():
        # As data.read_annotations: 'v_' + an 11-character YouTube id is a file-name prefix; two real
        # ActivityNet ids start with 'v_' themselves and stay whole.
        key = vid[2:] if vid.startswith("v_") and len(vid) == 13 else vid
        row = np.asarray(row, dtype=np.float64)
        if row.shape != (len(names),) or not np.isfinite(row).all():
            raise ValueError(f"{path}: video {vid} has {row.shape} scores, expected {len(names)} finite values")
        if key in scores:
            raise ValueError(f"{path}: video {key} appears twice (with and without 'v_')")
        scores[key] = row
    return scores, names


def write_video_scores(path, scores, names):
    """dict id -> (K,) scores and the K class names -> a CUHK-format file, as read_video_scores reads it."""
    Path(path).write_text(json.dumps({"results": {k: np.asarray(p).tolist() for k, p in scores.items()},
                                      "class": list(names)}))


# ---------------- per-video features
def rescale(x, L, scale=None, offset=0.5):
    """(D, T) features -> (D, L) by linear interpolation between the T snippet centres: output i samples the
    input at position (i + 0.5) scale - offset, clamped to [0, T - 1]. By default scale = T / L: T snippets
    tiling the video (F.interpolate's align_corners=False rule; T = L is the identity)."""
    T = x.shape[1]
    u = ((torch.arange(L, dtype=torch.float64) + 0.5) * (T / L if scale is None else scale) - offset).clamp(0, T - 1)
    lo = u.floor().long()                                                                     # (L,)
    w = (u - lo).to(x.dtype)
    return x[:, lo] * (1 - w) + x[:, (lo + 1).clamp(max=T - 1)] * w                          # (D, L)


def read_features(folder, videos, L):
    """Per-video features, one <id>.npy or v_<id>.npy of shape (T, D) a video (T snippets in time order
    covering the video; any T, one D) -> dict id -> (D, L), rescaled and layer-normalised as
    snippet_features does it. Every video needs its file. With a features.json of feat_stride, num_frames
    and each video's frames n (lofi.py --stage extract), the L bins tile those n frames: bin i samples the
    snippet position ((i + 0.5) n / L - num_frames / 2) / feat_stride, where snippet k spans frames from k
    feat_stride; without it, (i + 0.5) T / L - 0.5 (T snippets tiling the video)."""
    feats, first, missing, index = {}, None, [], {}           # first: (D, path) of the first file read
    with contextlib.suppress(OSError, ValueError):
        index = json.loads((Path(folder) / "features.json").read_text())
    index = index if isinstance(index, dict) and isinstance(index.get("videos", {}), dict) else {}  # (not ours)
    stride, span = index.get("feat_stride"), index.get("num_frames")
    for v in videos:
        path = next((p for p in (Path(folder) / f"v_{v.id}.npy", Path(folder) / f"{v.id}.npy") if p.is_file()), None)
        if path is None:
            missing.append(v.id)
            continue
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a numpy array file ({e})") from None
        if x.ndim != 2 or min(x.shape) < 1 or x.dtype.kind not in "iuf" or not np.isfinite(x).all():
            raise ValueError(f"{path}: expected a finite (T, D) array of snippet features, got shape {x.shape}")
        first = first or (x.shape[1], path)
        if x.shape[1] != first[0]:
            raise ValueError(f"{path}: D = {x.shape[1]}, but {first[1]} has D = {first[0]}")
        n = index.get("videos", {}).get(v.id, {}).get("frames") if stride else None
        if stride and n is None:  # a file the extraction did not record (killed before it saved): unfinished
            missing.append(v.id)
            continue
        where = [n / (L * stride), span / (2 * stride)] if n else []                         # (scale, offset)
        y = rescale(torch.from_numpy(x.astype(np.float32)).T, L, *where)                     # (D, L)
        feats[v.id] = F.layer_norm(y.T, y.shape[:1]).T.contiguous()                           # (D, L)
    if missing:
        raise ValueError(f"--features {folder}: no <id>.npy or v_<id>.npy (or no record in its features.json) for "
                         f"{len(missing)} video(s): " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    return feats


def open_features(folder, layout, write, clear=False, retry=False):
    """A folder for v_<id>.npy features of `layout` (the entries of its features.json) -> its index: the layout,
    `videos` (id -> record) that have a file, `broken` (id -> why none; retry: forgotten). Another layout, an
    unreadable index or .npy files without one: ValueError saying so, or (clear) its .npy files deleted. A new
    index is written at once with write(path, fn) (an atomic writer): a kill leaves files of a known layout."""
    folder, path = Path(folder), Path(folder) / "features.json"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        held = json.loads(path.read_text()) if path.exists() else None
        other = held and {k: held.get(k) for k in layout if held.get(k) != layout[k]}
        if held is not None and not (isinstance(held.get("videos"), dict) and isinstance(held.get("broken"), dict)):
            raise ValueError("no 'videos' and 'broken' objects")
    except (OSError, ValueError, AttributeError) as e:  # (AttributeError: not a JSON object)
        held, other = None, f"unreadable ({type(e).__name__}: {e})"
    if held is None and not other and any(folder.glob("*.npy")):
        other = "no such file, but .npy files of an unknown layout beside it"
    if other and not clear:
        why = other if isinstance(other, str) else f"features of another layout (it has {other})"
        raise ValueError(f"{path}: {why}; --overwrite deletes the .npy files")
    if other or held is None:
        for f in folder.glob("*.npy"):
            f.unlink()
        held = dict(layout, videos={}, broken={})
        write(path, lambda f: f.write(json.dumps(held).encode()))
    held["videos"] = {k: v for k, v in held["videos"].items() if (folder / f"v_{k}.npy").exists()}
    held["broken"] = {} if retry else held["broken"]
    return held


def save_features(folder, index, ids, write):
    """A feature folder's features.json (`index`) and missing_files.txt: the `ids` without a file, OpenTAD's
    block list; each by write(path, fn), an atomic writer."""
    write(Path(folder) / "features.json", lambda f: f.write(json.dumps(index).encode()))
    write(Path(folder) / "missing_files.txt", lambda f: f.write("".join(
        f"{k}\n" for k in sorted(ids) if k not in index["videos"]).encode()))


# ---------------- video-level classes (spec §5.6)
def pooled(feat):
    """A video's (D, L) snippet features -> (2D,): mean and max over time."""
    return torch.cat([feat.mean(1), feat.amax(1)])


def video_classifier(dim, num_classes):
    return nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, num_classes))     # on [mean, max]


def train_video_classifier(feats, videos, classes, seed, steps=300):
    """The video-level classifier whose top classes assign_classes uses, when no CUHK score file is
    given: a linear layer on pooled features, multi-label (a video may hold several classes)."""
    x = torch.stack([pooled(feats[v.id]) for v in videos])                                  # (N, 2D)
    y = torch.zeros(len(videos), len(classes))                                                 # (N, K)
    for i, v in enumerate(videos):
        for label in v.labels:
            y[i, classes.index(label)] = 1.0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clf = video_classifier(x.shape[1] // 2, len(classes))
        opt = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(clf(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf


@torch.no_grad()
def video_class_scores(clf, feat):
    return torch.sigmoid(clf(pooled(feat)[None]))[0].numpy()                                # (K,)


@torch.no_grad()
def detections_for(head, feat, duration, class_scores, class_names, sigma=0.84, top_k=100):
    """One video's (D, L) features -> its ActivityNet result entries: maps, decoding, soft-NMS, classes."""
    out = head(feat[None].to(next(head.parameters()).device))
    segments, scores = decode({k: v[0].float().cpu() for k, v in out.items()}, duration, sigma=sigma, top_k=top_k)
    return assign_classes(segments, scores, class_scores, class_names, top=2)


def from_checkpoint(ck):
    """The head and the video classifier a stage-3 checkpoint of lofi.py holds, in eval mode."""
    head = GTAD(GTADConfig(**ck["head_cfg"]))
    clf = video_classifier(head.cfg.feat_dim, len(ck["classes"]))
    head.load_state_dict(ck["head"])
    clf.load_state_dict(ck["video_classifier"])
    return head.eval(), clf.eval()


def detect_videos(head, feats, videos, scores, sigma=0.84, top_k=100):
    """Detections of `videos` ({id: [entry]}), classes from scores(video) -> (class scores, names), less
    the labels absent from their ground truth: the official evaluator refuses those, and a class seen
    only in training can still be predicted (a warning counts them). -> {id: [entry]}"""
    known = {label for v in videos for label in v.labels}
    results = {v.id: detections_for(head, feats[v.id], v.duration, *scores(v), sigma, top_k) for v in videos}
    dropped = sum(d["label"] not in known for found in results.values() for d in found)
    if dropped:
        warnings.warn(f"{dropped} detections carry classes absent from the ground truth; dropped")
    return {vid: [d for d in found if d["label"] in known] for vid, found in results.items()}
