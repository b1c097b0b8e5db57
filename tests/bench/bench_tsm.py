"""Bench for issue 2: memory saved for backward and time of TSM activation checkpointing.

One training step (train mode, forward + backward) of TSM on one F-frame clip, with
checkpoint=False and checkpoint=True, measured side by side in one run:
  - bytes saved for backward: saved_tensors_hooks, de-duplicated by storage, parameters
    excluded (checkpoint's own saved segment inputs are seen by the hooks, so they count);
  - gradients and BatchNorm running statistics of the two runs compared;
  - forward + backward time, median of interleaved repeats, and the ratio;
  - with --units: the per-stage alternative to the per-block units (saved bytes, and an
    estimated backward peak: held segment inputs + the largest recomputed unit);
  - on CUDA: peak allocated memory of the step as well.

    python tests/bench/bench_tsm.py                       # TSM-R18, 8 x 224^2, CPU
    python tests/bench/bench_tsm.py --units --bf16        # plus per-stage and bf16 autocast rows
    python bench_tsm.py --device cuda --units --bf16 --clips 16 --reps 5   # on a GPU
"""
import argparse
import copy
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path.cwd()))
import tsm  # noqa: E402

MiB = 2 ** 20


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of tensors saved for backward, once per storage, parameters excluded."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen = {}
        super().__init__(self.pack, lambda t: t)

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.params:
            self.seen[s.data_ptr()] = s.nbytes()
        return t

    def total(self):
        return sum(self.seen.values())


def per_stage(self):
    """The alternative unit choice: the stem, then whole residual stages."""
    yield [self.conv1, self.bn1, self.relu, self.maxpool]
    for layer in self.layers():
        yield [layer]


def step(model, x, bf16, count_saved=False):
    """One forward + backward; returns (saved bytes, seconds, grads, peak cuda bytes or None)."""
    saved = SavedBytes(model)
    model.zero_grad(set_to_none=True)
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    hooks = saved if count_saved else nullcontext()
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    t0 = time.perf_counter()
    with hooks, amp:
        out = model(x)  # (N, D)
    out.float().square().sum().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    grads = [p.grad.clone() for p in model.parameters()]
    return saved.total(), seconds, grads, peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--clips", type=int, default=1, help="clips per step; memory is reported per clip")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=3, help="timed repeats of each variant (interleaved)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--units", action="store_true", help="also measure per-stage checkpointing")
    parser.add_argument("--bf16", action="store_true", help="also measure under bf16 autocast")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    x = torch.randn(args.clips, args.frames, 3, args.size, args.size, device=dev)  # (N, F, 3, H, W)
    base = tsm.TSM(tsm.TSMConfig(depth=args.depth)).to(dev).train()
    variants = [("none", False, False, False), ("per block", True, False, False)]
    if args.units:
        variants.append(("per stage", True, True, False))
    if args.bf16:
        variants += [("none, bf16", False, False, True), ("per block, bf16", True, False, True)]

    rows = {}
    for name, ckpt, stage, bf16 in variants:
        model = copy.deepcopy(base)
        model.cfg.checkpoint = ckpt
        if stage:
            model.segments = per_stage.__get__(model)
        saved, _, grads, peak = step(model, x, bf16, count_saved=True)
        stats = [b.clone() for b in model.buffers()]
        rows[name] = dict(model=model, bf16=bf16, saved=saved, grads=grads, stats=stats, peak=peak, times=[])
    # Backward with checkpointing walks the units in reverse; recomputing unit k re-materialises
    # what unit k saves without checkpointing, while the inputs of units 0..k are still held.
    # Estimated backward peak = max over k of (inputs of units 0..k + unit k's saved bytes).
    probe = copy.deepcopy(base)
    block_units, stage_units, est_peak = [], [], {}
    for key, segments, units in (("block", probe.segments(), block_units),
                                 ("stage", per_stage(probe), stage_units)):
        h, held, est_peak[key] = x.flatten(0, 1), 0, 0  # (F, 3, H, W)
        for mods in segments:
            held += h.untyped_storage().nbytes()
            saved = SavedBytes(probe)
            with saved:
                h = probe.run_segment(mods, h, args.frames)
            units.append(saved.total())
            est_peak[key] = max(est_peak[key], held + units[-1])

    for _ in range(args.reps):
        for name, r in rows.items():
            r["times"].append(step(r["model"], x, r["bf16"])[1])

    ref = {False: rows["none"], True: rows.get("none, bf16")}
    print(f"TSM-R{args.depth}, {args.clips} x {args.frames}-frame {args.size}^2 clip(s), train mode, device {dev}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps}\n")
    print("| checkpointing | saved for backward (MiB/clip) | vs none | est. backward peak, fp32 (MiB/clip) "
          "| peak CUDA (MiB/step) | fwd+bwd (s) | time vs none | max abs grad diff | BN stats equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        b = ref[r["bf16"]]
        diff = max((g - h).abs().max().item() for g, h in zip(r["grads"], b["grads"]))
        same_stats = all(torch.equal(s, t) for s, t in zip(r["stats"], b["stats"]))
        key = "stage" if "stage" in name else "block"
        transient = "-" if name.startswith("none") or r["bf16"] else f"{est_peak[key] / MiB / args.clips:.1f}"
        peak = "-" if r["peak"] is None else f"{r['peak'] / MiB:.0f}"
        t, tb = statistics.median(r["times"]), statistics.median(b["times"])
        print(f"| {name} | {r['saved'] / MiB / args.clips:.1f} | {r['saved'] / b['saved']:.2f} | {transient} | {peak} "
              f"| {t:.3f} | {t / tb:.2f} | {diff:.2e} | {same_stats} |")
    print(f"\nunits (fp32, MiB/clip saved when run without checkpointing): per block "
          f"{[round(u / MiB / args.clips, 1) for u in block_units]}; "
          f"per stage {[round(u / MiB / args.clips, 1) for u in stage_units]}")


if __name__ == "__main__":
    main()
