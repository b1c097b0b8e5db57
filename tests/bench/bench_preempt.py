"""How fast a preempted run stops: SIGTERM at a random moment inside an epoch of stage 2 (train.sh's tiny
preset, its synthetic videos, one process, no --save-every) -> seconds until the process has saved the
step it was in and exited (code 3), against the run's own step time; then --resume, which must finish.

    python tests/bench/bench_preempt.py [--repeats 3] [--videos 32]

SLURM sends SIGKILL 30 s after SIGTERM (its KillWait default): the stop takes one step plus one save.
"""
import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
import synthetic  # noqa: E402  (beside this file)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--videos", type=int, default=32)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.synth(Path(tmp) / "synth", videos=args.videos, seed=0)
        for r in range(args.repeats):
            out = Path(tmp) / f"run{r}"
            cmd = [sys.executable, str(ROOT / "lofi.py"), "--stage", "lofi", "--preset", "tiny", "--amp",
                   "--anno", f"{tmp}/synth/anno.json", "--videos", f"{tmp}/synth/videos", "--epochs", "3",
                   "--out", str(out)]
            job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            while not (out / "log.jsonl").exists() and job.poll() is None:   # epoch 0 done: its step time
                time.sleep(0.01)
            epoch = json.loads((out / "log.jsonl").read_text().splitlines()[0])
            step = epoch["time"] / epoch["steps"]
            time.sleep(rng.uniform(0.2, 0.8) * epoch["time"])                  # somewhere inside epoch 1
            t0 = time.time()
            job.send_signal(signal.SIGTERM)
            err = job.communicate()[1]
            stop = time.time() - t0
            said = [line for line in err.splitlines() if "SIGTERM" in line]
            again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
            print(f"run {r}: exit {job.returncode}, stopped {stop:.2f} s after SIGTERM (a step: {step:.2f} s; "
                  f"{stop / step:.1f} steps); {said[-1] if said else err[-300:]}; --resume exit {again.returncode}")


if __name__ == "__main__":
    main()
