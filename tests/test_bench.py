"""tests/bench/gpu_check.py --tiny end to end: it runs, and its report has every figure, each sane.
No timing thresholds (the CPU is shared): the structure, the exit codes and the FLOP checks only."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_gpu_check_tiny(tmp_path):
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(ROOT / "tests/bench/gpu_check.py"), "--tiny", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "error" not in report and report["preset"] == "tiny" and report["device"] == "cpu"
    # a) stages 1-3 each ran, in a gloo process group, and exited 0
    assert "gloo" in report["launch"]
    assert {k: r["rc"] for k, r in report["stages"].items()} == {"acp": 0, "lofi": 0, "head": 0}
    assert all(positive(r["seconds"]) for r in report["stages"].values())
    # b-d) every fidelity, at the tiny geometry's sizes (data.py's Eq. 2-4 of 12 x 32^2)
    rows = report["fidelities"]
    assert {k: r["fidelity"] for k, r in rows.items()} == {"full": "12x32x32", "S": "12x16x16", "T": "3x32x32",
                                                           "ST": "6x22x22"}
    for r in rows.values():
        assert positive(r["bf16_over_fp32"]) and positive(r["gflop_per_video"])
        for prec in ("fp32", "bf16"):
            assert positive(r[prec]["s_per_video"]) and positive(r[prec]["tflops"])
            assert r[prec]["step_peak_mib_per_video"] is None                       # CUDA only
            assert r[prec]["mib_per_video"] is None or positive(r[prec]["mib_per_video"])
        assert positive(r["fp32"]["mib_per_video"])
    # activations shrink with the fidelity: S and T hold less than full fidelity
    assert rows["S"]["fp32"]["mib_per_video"] < rows["full"]["fp32"]["mib_per_video"]
    assert rows["T"]["fp32"]["mib_per_video"] < rows["full"]["fp32"]["mib_per_video"]
    # d) the FLOP counter's checks held, and the report says so with its numbers
    c = report["flop_checks"]
    assert c["ok"] and abs(c["resnet18_gmac"] / 1.81 - 1) <= 0.03
    assert 0.2 <= c["t_over_full"] <= 0.3 and c["s_over_full"] < 1
    assert "FLOP checks hold" in run.stdout
    # e) extraction throughput, in memory and from the synthetic video files
    assert set(report["extract"]) == {"fp32_videos_per_s", "bf16_videos_per_s", "files_videos_per_s"}
    assert all(positive(v) for v in report["extract"].values())
