"""TSM video encoder: torchvision ResNet-18/34/50 with a temporal shift in every residual block.

The LoFi paper (Sec. 3.3, "Implementation details"; Sec. 4.6) uses a ResNet-based TSM
(Lin et al., ICCV 2019) as the video encoder; TSM-R18 is the default. A snippet of F frames
is folded into the batch, every residual branch sees 1/8 of its channels from the next
frame and 1/8 from the previous one (the official `blockres` placement, zero padded at the
clip ends), and the pooled per-frame features are averaged into one D-vector per snippet.
Parameter names are torchvision's, with the official `.net.` infix on each shifted conv1,
so released TSM checkpoints and torchvision weights load through one mapping function.

Used from lofi.py (`build_encoder`, `LoFiNet`, `encode`, `recalibrate_bn`, `training_memory`).
Check a weights file by hand:
    python tsm.py PATH/TO/weights.pth [--depth 18]
Tests (CPU, seconds):
    python -m pytest -q tests/test_tsm.py
"""
import argparse
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.checkpoint import checkpoint

import gtad

# The ImageNet statistics that torchvision's and the official TSM weights were trained with (RGB).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(x):
    """uint8 RGB frames (..., 3, H, W) -> float32 (..., 3, H, W): /255, minus MEAN, over STD."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 frames, got {x.dtype}")
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"normalize expects (..., 3, H, W) RGB frames, got shape {tuple(x.shape)}")
    mean = torch.tensor(MEAN, device=x.device).view(3, 1, 1)  # (3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(3, 1, 1)  # (3, 1, 1)
    return (x.float() / 255 - mean) / std  # (..., 3, H, W)


@dataclass
class TSMConfig:
    depth: int = 18  # ResNet-18, 34 or 50 (the paper's TSM-R18 default, Sec. 4.6 for 34/50)
    shift_div: int = 8  # 1/shift_div of the channels move each way; 0 turns the shift off (plain TSN)
    checkpoint: bool = False  # recompute activations in backward (memory-bound end-to-end stage)


def temporal_shift(x, n_frames, shift_div):
    """(N*F, C, H, W) -> (N*F, C, H, W); channels [0, fold) take frame t+1, [fold, 2 fold) frame t-1.

    Zeros enter at each clip's ends, so clips folded into one batch never see each other.
    Out of place: shifting in place would also change the identity path of the block.
    Slice copies into zeros_like (not torch.cat) keep a channels_last input channels_last.
    """
    if shift_div == 0:
        return x
    NF, C, H, W = x.shape
    if NF % n_frames:
        raise ValueError(f"batch of {NF} frames is not a whole number of {n_frames}-frame clips")
    fold = C // shift_div
    x = x.view(NF // n_frames, n_frames, C, H, W)  # (N, F, C, H, W)
    out = torch.zeros_like(x)  # (N, F, C, H, W), same memory format as x
    out[:, :-1, :fold] = x[:, 1:, :fold]  # the future frame
    out[:, 1:, fold:2 * fold] = x[:, :-1, fold:2 * fold]  # the past frame
    out[:, :, 2 * fold:] = x[:, :, 2 * fold:]
    return out.view(NF, C, H, W)  # (N*F, C, H, W)


class TemporalShift(nn.Module):
    """Shift, then the block's conv1 (`net`): TSM's residual-branch ("blockres") placement.

    `n_frames` is set by TSM before every forward from the input's shape: no global state,
    so clips of any length can follow each other, and recomputation sees the right value.
    """

    def __init__(self, net, shift_div):
        super().__init__()
        self.net, self.shift_div, self.n_frames = net, shift_div, None

    def forward(self, x):  # (N*F, C, H, W)
        if self.n_frames is None:
            raise RuntimeError("TemporalShift.n_frames is unset; call it through TSM.forward")
        return self.net(temporal_shift(x, self.n_frames, self.shift_div))


@contextmanager
def restore_buffers(modules):
    """Undo whatever the body does to the modules' buffers.

    Used around the recomputation in backward: BatchNorm in training mode updates
    running_mean / running_var / num_batches_tracked on every forward, so without this a
    checkpointed step would update them twice. The recomputed outputs do not depend on
    them (training mode normalises with the batch statistics). Switching the updates off
    instead (track_running_stats=False) changes what BatchNorm saves for backward, which
    checkpoint rejects as a non-deterministic recomputation.
    """
    buffers = [b for module in modules for b in module.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def recompute_context(modules):
    """checkpoint's context_fn: the forward runs as usual, the recomputation restores the buffers."""
    return nullcontext(), restore_buffers(modules)


class TSM(nn.Module):
    """forward(x: (N, F, 3, H, W) normalised frames) -> (N, D) snippet features, D = self.dim."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.depth not in (18, 34, 50):
            raise ValueError(f"TSM depth must be 18, 34 or 50, got {cfg.depth}")
        if cfg.shift_div < 0:
            raise ValueError(f"shift_div must be >= 0 (0 = no shift), got {cfg.shift_div}")
        self.cfg = cfg
        resnet = getattr(torchvision.models, f"resnet{cfg.depth}")(weights=None)
        self.dim = resnet.fc.in_features  # 512 (R18/34) or 2048 (R50); the fc itself is dropped
        # Same attribute names as torchvision, so parameter names match its state dicts.
        self.conv1, self.bn1, self.relu, self.maxpool = (resnet.conv1, resnet.bn1, resnet.relu,
                                                         resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (resnet.layer1, resnet.layer2,
                                                              resnet.layer3, resnet.layer4)
        for layer in self.layers():
            for block in layer:
                block.conv1 = TemporalShift(block.conv1, cfg.shift_div)

    def layers(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def segments(self):
        """The units of activation checkpointing: the stem, then each residual block.

        Measured on one 8-frame 224^2 clip, fp32 (notes/bench_tsm.py), saved for backward
        with no checkpointing / per block / per stage: R18 192 / 33 / 21 MiB, R50 827 / 176 /
        54 MiB. Per stage holds less, but backward recomputes one unit at a time and a whole
        stage is large, so the peak is not lower: CUDA peak of a 16-clip R18 step 3056 / 1612 /
        1613 MiB, of an 8-clip R50 step 6658 / 1959 / 2946 MiB (H200). Per block keeps the
        peak at one block for every depth, for the same price (about one extra forward). The
        stem is its own unit because its 112^2 maps are the largest activations.
        """
        yield [self.conv1, self.bn1, self.relu, self.maxpool]
        for layer in self.layers():
            for block in layer:
                yield [block]

    @staticmethod
    def run_segment(modules, x, n_frames):  # (N*F, C, H, W) -> (N*F, C', H', W')
        # n_frames is set here, inside the checkpointed function, so that a recomputation
        # after a later forward with another F still shifts with this clip's F.
        for module in modules:
            for m in module.modules():
                if isinstance(m, TemporalShift):
                    m.n_frames = n_frames
            x = module(x)
        return x

    def forward(self, x):  # (N, F, 3, H, W)
        if x.dim() != 5 or x.shape[2] != 3:
            raise ValueError(f"TSM expects (N, F, 3, H, W) frames, got shape {tuple(x.shape)}")
        N, F = x.shape[:2]
        h = x.flatten(0, 1)  # (N*F, 3, H, W), frame-major per clip
        for modules in self.segments():
            if self.cfg.checkpoint and torch.is_grad_enabled():
                h = checkpoint(self.run_segment, modules, h, F, use_reentrant=False,
                               context_fn=partial(recompute_context, modules))
            else:
                h = self.run_segment(modules, h, F)
        h = h.mean((2, 3))  # (N*F, D) per-frame features
        # The official model averages per-frame logits; its fc is linear, so averaging the
        # features first and applying a classifier afterwards gives the same result.
        return h.view(N, F, -1).mean(1)  # (N, D)


def load_state(model, state, source):
    """Load `state` (any accepted key grammar) into `model`; strict, with errors that name `source`."""
    # Compare names in the plain torchvision grammar: drop DataParallel's `module.`, TSN's
    # `base_model.` and the blockres wrapper's `conv1.net.`. Other `.net.` infixes (the
    # official `block` placement, temporal pooling) are different models and stay unexpected.
    def plain(key):
        for prefix in ("module.", "base_model."):
            key = key.removeprefix(prefix)
        return key.replace(".conv1.net.", ".conv1.")

    target = model.state_dict()
    ours = {plain(k): k for k in target}
    mapped, found, ignored, unexpected, mismatched = {}, set(), [], [], []
    for key, value in state.items():
        name = plain(key)
        if name.startswith(("fc.", "new_fc.")):  # a classifier head: the encoder has none
            ignored.append(key)
        elif name not in ours:
            unexpected.append(key)
        elif value.shape != target[ours[name]].shape:
            found.add(ours[name])
            mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(target[ours[name]].shape)}")
        else:
            found.add(ours[name])
            mapped[ours[name]] = value
    # Pre-2018 PyTorch files lack BatchNorm's num_batches_tracked; it does not affect outputs.
    missing = [k for k in target if k not in found and not k.endswith("num_batches_tracked")]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("shape mismatch", mismatched)) if keys]
    if problems:
        raise ValueError(f"{source}: weights do not fit TSM-R{model.cfg.depth}; " + "; ".join(problems))
    model.load_state_dict({**target, **mapped}, strict=True)
    return dict(loaded=sorted(mapped), ignored=ignored)


def read_checkpoint(path):
    """The file's tensors, loaded to the CPU with weights_only=True (no pickled code runs); a file missing or
    unreadable -> FileNotFoundError or ValueError, naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled code: all unusable
        why = (str(e).strip().splitlines() or [""])[0][:160]  # (torch's runs to pages)
        raise ValueError(f"{path}: cannot read it as a PyTorch checkpoint ({type(e).__name__}: {why})") from None


def load_weights(model, path, ckpt=None):
    """Load an official TSM release, a torchvision ResNet state dict or this project's checkpoint
    (`ckpt`: the file's contents when the caller has read it already).

    Returns dict(loaded=[model keys], ignored=[file keys of classifier heads]).
    """
    path, ckpt = Path(path), read_checkpoint(path) if ckpt is None else ckpt
    if isinstance(ckpt, dict) and "encoder" in ckpt:  # this project's checkpoint (lofi.py)
        cfg = ckpt.get("encoder_cfg") or {}
        if cfg.get("depth", model.cfg.depth) != model.cfg.depth:
            raise ValueError(f"{path}: checkpoint holds a TSM-R{cfg['depth']} encoder but the model is "
                             f"TSM-R{model.cfg.depth}; build it with TSMConfig(**ckpt['encoder_cfg'])")
        if cfg.get("shift_div", model.cfg.shift_div) != model.cfg.shift_div:
            warnings.warn(f"{path}: encoder trained with shift_div={cfg['shift_div']}, "
                          f"loading into shift_div={model.cfg.shift_div}")
        state = ckpt["encoder"]
    elif isinstance(ckpt, dict) and "state_dict" in ckpt:  # official TSM release (main.py)
        state = ckpt["state_dict"]
    else:  # a bare state dict (torchvision)
        state = ckpt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    return load_state(model, state, path)


def imagenet_tsm(cfg):
    """TSM initialised from torchvision's ImageNet weights (downloaded; needs a network).

    IMAGENET1K_V1 is what the official TSM training started from (torchvision's pretrained=True).
    """
    weights = getattr(torchvision.models, f"ResNet{cfg.depth}_Weights").IMAGENET1K_V1
    model = TSM(cfg)
    load_state(model, weights.get_state_dict(progress=True, weights_only=True), weights.url)
    return model


def build_encoder(depth=18, init="none", ckpt=None, checkpoint=False):
    """The encoder every stage starts from: random (init 'none'), torchvision's ImageNet weights
    ('imagenet'), or the weights file at path `init`, whose contents `ckpt` the caller has read.
    A lofi.py checkpoint knows its own depth (`encoder_cfg`), which then wins over `depth`.
    -> (encoder, a line saying where its weights came from)."""
    cfg = TSMConfig(depth=depth, checkpoint=checkpoint)
    if init == "imagenet":
        return imagenet_tsm(cfg), "encoder from torchvision's ImageNet weights"
    if init == "none":
        return TSM(cfg), "encoder initialised at random"
    if isinstance(ckpt, dict) and "encoder_cfg" in ckpt:
        if ckpt["encoder_cfg"] is None:
            raise ValueError(f"{init}: holds no encoder (a head trained on precomputed features)")
        cfg = TSMConfig(**{**ckpt["encoder_cfg"], "checkpoint": checkpoint})
    encoder = TSM(cfg)
    report = load_weights(encoder, init, ckpt)
    return encoder, f"encoder from {init}: {len(report['loaded'])} tensors, ignored {report['ignored']}"


class ClipNet(nn.Module):
    """Stage 1's classifier: the encoder and a linear layer over its (N, D) clip features."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder, self.fc = encoder, nn.Linear(encoder.dim, num_classes)
        # A zero classifier starts every clip at the uniform prediction: first loss ln K, whatever the
        # scale of the encoder's features (hundreds from scratch: an initial loss of 3.5 for K = 3).
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, frames):                                        # (B, F, 3, H, W) uint8
        return self.fc(self.encoder(normalize(frames)))           # (B, K)


def encode(encoder, frames):
    """Raw snippet features (B, L, D) float32 of frames (B, L, F, 3, H, W) uint8 (stage 3 stores these)."""
    B, L = frames.shape[:2]
    return encoder(normalize(frames.flatten(0, 1))).float().view(B, L, -1)               # (B, L, D)


def snippet_features(encoder, frames):
    """Snippet features (B, D, L) as every stage feeds the head: each snippet's feature layer-normalised
    without parameters. G-TAD has no normalisation of its own, and the scale of an encoder's features
    depends on how it was trained (hundreds after ACP from scratch), which saturates its sigmoids."""
    x = encode(encoder, frames)                                                               # (B, L, D)
    return F.layer_norm(x, x.shape[-1:]).transpose(1, 2)                                      # (B, D, L)


class LoFiNet(nn.Module):
    """The TAL model of LoFi's Fig. 1: the encoder on each snippet, then a head (G-TAD) over the L snippets."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, frames):                                        # (B, L, F, 3, H, W) uint8
        return self.head(snippet_features(self.encoder, frames))      # maps (B, L, L)


def set_bn_eval(model):
    """BatchNorm layers in eval mode (running statistics, no update): for small per-GPU batches."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def recalibrate_bn(encoder, clips):
    """Re-estimate every BatchNorm's running statistics from `clips`, an iterable of uint8 frame batches
    (N, F, 3, H, W): each layer's batch statistics averaged over all of them (momentum None), weights
    untouched. LoFi's stage 2 leaves the statistics of its last low-fidelity configuration (e.g. 112^2
    frames), which full-fidelity features would otherwise be normalised with (beyond the paper)."""
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    encoder.train()
    for x in clips:
        encoder(normalize(x))                           # (N, D), only the statistics matter
    for m in norms:
        m.momentum = 0.1
    return encoder.eval()


def step_memory(fn, params, device, amp):
    """Bytes one forward + backward of fn() holds for backward: on CUDA its peak allocated, elsewhere the
    tensors autograd saves (each storage once), without the weights (counted as fixed) and G-TAD's
    sparse alignment matrices (constants shared by all videos)."""
    for _ in range(2 if device.type == "cuda" else 1):   # CUDA: the first run warms up allocators and caches
        storages, skip = {}, {p.untyped_storage().data_ptr() for p in params}

        def pack(t):
            if t.layout == torch.strided and t.untyped_storage().data_ptr() not in skip:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        out.backward()
        held = sum(storages.values())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            held = torch.cuda.max_memory_allocated(device) - base
    return held



def snippet_memory(cfg, frames, H, W, device, amp, k):
    """(bytes per snippet, fixed bytes) a training step of the encoder holds: the marginal cost of a
    snippet (the encoder on k and 2k snippets, which are independent), and what does not grow with them
    (weights and gradients; the bf16 weight copies under amp)."""
    encoder = TSM(cfg).to(device).train()

    def step(n):
        x = torch.randint(0, 256, (n, frames, 3, H, W), dtype=torch.uint8, device=device)
        return lambda: encoder(normalize(x)).float().square().mean()
    m1, m2 = (step_memory(step(n), [*encoder.parameters()], device, amp) for n in (k, 2 * k))
    per = (m2 - m1) / k
    return per, 2 * sum(p.numel() * p.element_size() for p in encoder.parameters()) + max(0.0, m1 - per * k)


def training_memory(depth, frames, fid, device, checkpoint, amp, snippets):
    """(bytes per video, fixed bytes) of a LoFiNet training step at fidelity fid (a data.Fidelity): the
    encoder's per snippet (measured on k = min(snippets, L) and 2k) times L, plus the G-TAD head's at L."""
    cfg = TSMConfig(depth=depth, checkpoint=checkpoint)
    per_snippet, fixed = snippet_memory(cfg, frames, fid.H, fid.W, device, amp, min(fid.L, snippets))
    head = gtad.GTADConfig(feat_dim=2048 if depth == 50 else 512)  # the encoder's D
    per_video, head_fixed = gtad.video_memory(head, fid.L, device, amp, step_memory)
    return per_snippet * fid.L + per_video, fixed + head_fixed



def memory_plan(depth, frames, fidelities, device, checkpoint=False, amp=False, budget_gb=None):
    """training_memory for each (name, data.Fidelity) -> rows: MiB a video adds, fixed MiB, the ratio to the first
    fidelity's; with budget_gb, the videos a device of that memory fits, with and without checkpoint and amp."""
    rows, ref, k = [], {}, 25 if device.type == "cuda" else 4  # the encoder measured on k and 2k snippets
    variants = [(c, a) for c in (False, True) for a in (False, True)] if budget_gb else [(checkpoint, amp)]
    for name, fid in fidelities:
        for c, a in variants:
            per_video, fixed = (x / 2**20 for x in training_memory(depth, frames, fid, device, c, a, k))
            rows.append(dict(config=name, fidelity=str(fid), checkpoint=c, amp=a, mib_per_video=per_video,
                             fixed_mib=fixed, ratio=per_video / ref.setdefault((c, a), per_video)))
            if budget_gb:
                rows[-1]["fits"] = max(0, int((budget_gb * 1024 - fixed) // per_video))
    return rows


def plan_table(rows):
    """memory_plan's rows as a Markdown table."""
    head = ["| config | L x H x W | ckpt | amp | MiB / video | x full | fixed MiB | fits |", "|---" * 8 + "|"]
    return "\n".join(head + [
        f"| {r['config']} | {r['fidelity']} | {r['checkpoint']} | {r['amp']} | {r['mib_per_video']:.0f} | "
        f"{r['ratio']:.2f} | {r['fixed_mib']:.0f} | {r.get('fits', '-')} |" for r in rows])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Check that a weights file loads into TSM.")
    parser.add_argument("path", help="official TSM .pth, torchvision state dict or lofi.py checkpoint")
    parser.add_argument("--depth", type=int, default=18, help="ResNet depth of the file: 18, 34 or 50")
    args = parser.parse_args()
    report = load_weights(TSM(TSMConfig(depth=args.depth)), args.path)
    print(f"loaded {len(report['loaded'])} tensors; ignored {report['ignored']}")
