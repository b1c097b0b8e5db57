"""Benchmark evaluate.py on the full ActivityNet-1.3 validation set, 4,728 videos x 100 predictions.

Makes a ~46 MB result file from the real validation ground truth with known perturbations
(tests/test_evaluate.py: perturbed_predictions: exact/jittered copies, random segments, 15 % wrong
labels, scores on a 0.01 grid so ties abound, half the ids with 'v_'), then in one run:
  - the CLI end to end, as a subprocess (Python start-up, imports, parsing, evaluation), --reps times;
  - the plain per-prediction loop of the official protocol (tests/test_evaluate.py: reference_map),
    with its json.load of both files;
  - json.load of the prediction file alone, as a yardstick for how loaded the machine is;
and checks that CLI and loop agree to 1e-9 at every threshold.

    python tests/bench/bench_evaluate.py [--reps 5] [--keep /tmp/bench_pred.json]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAIN = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(MAIN), str(MAIN / "tests")]
import numpy as np  # noqa: E402
from test_evaluate import perturbed_predictions, reference_map  # noqa: E402

GT = MAIN.parent / "shared" / "data" / "activitynet13_annotations.json"


def child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--keep", help="reuse / keep the prediction file at this path")
    args = p.parse_args()
    gt_doc = json.loads(GT.read_text())
    path = Path(args.keep) if args.keep else Path(tempfile.mkdtemp()) / "pred.json"
    if not path.exists():
        pred = perturbed_predictions(gt_doc, per_video=100, seed=0)
        path.write_text(json.dumps(pred))
    n_videos = len(json.loads(path.read_bytes())["results"])
    print(f"predictions: {path} ({path.stat().st_size / 1e6:.1f} MB, {n_videos} videos), "
          f"load {os.getloadavg()[0]:.2f}")

    out = path.with_suffix(".out.json")
    cmd = [sys.executable, str(MAIN / "evaluate.py"), "--gt", str(GT), "--pred", str(path),
           "--json", str(out)]
    walls, cpus = [], []
    for _ in range(args.reps):
        c0, t0 = child_cpu(), time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        cpus.append(child_cpu() - c0)
        assert run.returncode == 0, run.stderr
    fast = np.array(json.loads(out.read_text())["mAP"])
    print(run.stdout.strip().splitlines()[-1])

    t0, c0 = time.perf_counter(), time.process_time()
    json.loads(path.read_bytes())
    json_wall, json_cpu = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    gt_loaded, pred_loaded = json.loads(GT.read_bytes()), json.loads(path.read_bytes())
    t1 = time.perf_counter()
    slow = reference_map(gt_loaded, pred_loaded)
    loop_wall, loop_cpu = time.perf_counter() - t0, time.process_time() - c0
    loop_only = time.perf_counter() - t1

    diff = np.abs(fast - slow).max()
    print(f"max |CLI - loop| over the 10 thresholds: {diff:.2e}  ({'OK' if diff <= 1e-9 else 'FAIL'})")
    print(f"CLI end to end (subprocess), {args.reps} runs: wall min {min(walls):.3f} s, "
          f"median {statistics.median(walls):.3f} s; CPU min {min(cpus):.3f} s")
    print(f"plain loop incl. json.load: wall {loop_wall:.2f} s (loop alone {loop_only:.2f} s), "
          f"CPU {loop_cpu:.2f} s")
    print(f"json.load of the predictions alone: wall {json_wall:.3f} s, CPU {json_cpu:.3f} s")
    print(f"speed-up, loop / CLI median: {loop_wall / statistics.median(walls):.1f}x wall, "
          f"{loop_cpu / min(cpus):.1f}x CPU")
    print(f"load average now {os.getloadavg()[0]:.2f}")
    out.unlink()
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
