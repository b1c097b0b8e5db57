"""Peak host memory of stage 3's feature merge on rank 0 (issue 11: at most 2x the feature set).

Writes shards as four ranks would (SHARD_VIDEOS videos each, D = 512, L = 100, fp32), then merges them in
a fresh process and reads its peak resident memory (ru_maxrss) before and after; side by side, the way
it was done before (a dict of per-video tensors through all_gather_object, here in a world of one):

    python tests/bench/bench_merge.py [--videos 2000]
"""
import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import lofi  # noqa: E402

GATHER = """
import os, resource, sys, torch, torch.distributed as dist
from pathlib import Path
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4])
dist.init_process_group("gloo", rank=0, world_size=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
feats = {}        # what the old extract_features kept on a rank (views of one batch of 4, paper preset), gathered
for f in sorted(Path(sys.argv[2]).glob("*.pt")):
    part = torch.load(f, weights_only=True)
    for k in range(0, len(part["ids"]), 4):
        feats.update(zip(part["ids"][k:k + 4], part["feats"][k:k + 4].clone().unbind(0)))
    del part
out = [None]
dist.all_gather_object(out, feats)
merged = {}
for p in out:
    merged.update(p)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before * 1024, after * 1024, sum(v.numel() for v in merged.values()) * 4)
"""

MERGE = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import lofi
from pathlib import Path
ids = [f"v{i:06d}" for i in range(int(sys.argv[3]))]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
order, merged = lofi.merge_shards(Path(sys.argv[2]), ids)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert order == ids and merged.shape == (len(ids), 512, 100)
print(before * 1024, after * 1024, merged.numel() * 4)
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=2000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ids = [f"v{i:06d}" for i in range(args.videos)]
        for rank in range(4):                                     # each rank its stride, in shards
            mine = ids[rank::4]
            for k in range(0, len(mine), lofi.SHARD_VIDEOS):
                chunk = mine[k:k + lofi.SHARD_VIDEOS]
                lofi.save_checkpoint(folder / f"rank{rank}-{k:06d}.pt", dict(ids=chunk, feats=torch.randn(len(chunk), 512, 100)))
        for name, script in (("shards merged (now)", MERGE), ("all_gather_object of a dict (before)", GATHER)):
            out = subprocess.run([sys.executable, "-c", script, str(ROOT), str(folder), str(args.videos), "29517"],
                                 capture_output=True, text=True, check=True).stdout.split()
            before, after, size = map(int, out)
            print(f"{name}: {args.videos} videos, feature set {size / 2**20:.0f} MiB, peak resident memory "
                  f"{(after - before) / 2**20:.0f} MiB above the process's start = {(after - before) / size:.2f}x "
                  "the feature set")


if __name__ == "__main__":
    main()
