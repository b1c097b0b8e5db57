"""Fused vs unfused SGAlign + first localisation conv: peak memory and time of one G-TAD
forward + backward (model + loss) at B = 4, L = 100, feat 512, side by side in one run.

    python tests/bench/bench_gtad.py                      # CPU, the figures of issue 3
    python bench_gtad.py --repo . --device cuda --amp     # GPU, plus bf16 autocast rows and a CUDA parity check

Memory, CPU: torch.profiler(profile_memory=True) records every allocation and free made through
PyTorch's CPU allocator during the step; the peak of their running sum is the step's peak of live
tensor bytes above what was live before it (parameters, inputs and the cached sampling matrices
excluded; oneDNN/MKL internal scratch that bypasses the allocator is not seen). A second column
counts the unique storages autograd saves for backward (saved_tensors_hooks), parameters and the
cached sparse matrix excluded: the activation memory that the fusion is meant to remove.
Memory, CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the step.
Time: median over --reps interleaved steps after one warm-up step of each path.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

MB = 2 ** 20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[2]), help="checkout holding gtad.py")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--L", type=int, default=100)
    ap.add_argument("--feat", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--amp", action="store_true", help="also time both paths under bf16 autocast (CUDA)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.repo).resolve()))
    import gtad

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = gtad.GTAD(gtad.GTADConfig(feat_dim=args.feat)).to(dev)
    x = torch.randn(args.B, args.feat, args.L, device=dev)
    labels = [gtad.targets(torch.tensor([[0.1, 0.3], [0.5, 0.9]]), args.L) for _ in range(args.B)]
    start, end, iou = (torch.stack(t).to(dev) for t in zip(*labels))
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step(fused, amp=False):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x, fused=fused)
        gtad.loss(out, start, end, iou, generator=torch.Generator(dev).manual_seed(0))["total"].backward()
        model.zero_grad(set_to_none=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def saved_bytes(fused, amp=False):
        seen = {}

        def pack(t):
            if not t.is_sparse:
                st = t.untyped_storage()
                if st.data_ptr() not in param_ptrs:
                    seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step(fused, amp)
        return sum(seen.values())

    def peak_bytes(fused, amp=False):
        if dev.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(fused, amp)
            sync()
            return torch.cuda.max_memory_allocated() - base
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step(fused, amp)
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
        return peak

    variants = [("unfused", False, False), ("fused", True, False)]
    if args.amp:
        variants += [("unfused bf16", False, True), ("fused bf16", True, True)]
    if dev.type == "cuda":  # parity on the device, without TF32 so that the comparison is in fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with torch.no_grad():
            a, b = model(x, fused=True), model(x, fused=False)
        print("cuda parity fp32, max |fused - unfused|:", max((a[k] - b[k]).abs().max().item() for k in a))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    for _, fused, amp in variants:  # warm-up: sampling matrices, allocator, kernels
        step(fused, amp)
    times = {name: [] for name, _, _ in variants}
    for _ in range(args.reps):
        for name, fused, amp in variants:
            sync()
            t0 = time.perf_counter()
            step(fused, amp)
            sync()
            times[name].append(time.perf_counter() - t0)
    rows = {name: (peak_bytes(fused, amp), saved_bytes(fused, amp), statistics.median(times[name]))
            for name, fused, amp in variants}

    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nG-TAD forward + backward (model + loss), B={args.B}, L={args.L}, feat {args.feat}, {where}, "
          f"torch {torch.__version__}, median of {args.reps}\n")
    print("| path | peak memory (MB) | saved for backward (MB) | time (s) |")
    print("|---|---:|---:|---:|")
    for name, (peak, saved, sec) in rows.items():
        print(f"| {name} | {peak / MB:,.0f} | {saved / MB:,.0f} | {sec:.3f} |")
    for plain, fast in [("unfused", "fused"), ("unfused bf16", "fused bf16")]:
        if fast in rows:
            (p0, s0, t0), (p1, s1, t1) = rows[plain], rows[fast]
            print(f"| {fast} / {plain} | {p1 / p0:.3f} | {s1 / s0:.3f} | {t1 / t0:.3f} |")
    matrix = gtad._fused_matrix(args.L, 32, 4, dev, torch.float32)
    print(f"\ncached fused sampling matrix: {matrix._nnz():,} non-zeros, "
          f"{(matrix._indices().nbytes + matrix._values().nbytes) / MB:.1f} MB")


if __name__ == "__main__":
    main()
