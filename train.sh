#!/usr/bin/env bash
# The whole LoFi pipeline of the paper (Fig. 1), one commented line a stage.
#   bash train.sh                                    # synthetic videos, tiny preset, a CPU, minutes
#   bash train.sh --anno A.json --videos DIR --out RUNS --preset paper --nproc 4 [--seed S]
# Prints mAP of the baseline (head on the classification-pretrained encoder) and of LoFi.
set -euo pipefail
here=$(pwd)
cd "$(dirname "$0")"

ANNO="" VIDEOS="" OUT=runs PRESET=tiny NPROC=1 SEED=0
die() { echo "train.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --anno) ANNO=${2:?--anno needs a file}; shift 2 ;;
    --videos) VIDEOS=${2:?--videos needs a folder}; shift 2 ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --preset) PRESET=${2:?--preset needs tiny or paper}; shift 2 ;;
    --nproc) NPROC=${2:?--nproc needs a number}; shift 2 ;;
    --seed) SEED=${2:?--seed needs a number}; shift 2 ;;
    -h|--help) sed -n 2,5p "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see bash train.sh --help)" ;;
  esac
done
abs() { case "$1" in ""|/*) echo "$1" ;; *) echo "$here/$1" ;; esac; }   # paths are the caller's
ANNO=$(abs "$ANNO") VIDEOS=$(abs "$VIDEOS") OUT=$(abs "$OUT")
case "$PRESET" in tiny|paper) ;; *) die "--preset must be tiny or paper, not '$PRESET'" ;; esac
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, not '$NPROC'"
[[ "$SEED" =~ ^[0-9]+$ ]] || die "--seed must be a non-negative integer, not '$SEED'"
if [ -n "$ANNO$VIDEOS" ]; then
  [ -f "$ANNO" ] || die "annotation file '$ANNO' not found (--anno)"
  [ -d "$VIDEOS" ] || die "video folder '$VIDEOS' not found (--videos)"
else
  ANNO=data/synth/anno.json VIDEOS=data/synth/videos
  [ -f "$ANNO" ] || python data.py synth data/synth                      # synthetic dataset, once
fi
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
: > "$OUT/times.txt"

run() {  # run NAME ARGS...: one stage, on NPROC processes, timed; stop at the first failure
  local name=$1 t0=$SECONDS; shift
  echo "== stage $name"
  if [ "$NPROC" -gt 1 ]; then cmd=(torchrun --standalone --nproc_per_node="$NPROC" lofi.py); else cmd=(python lofi.py); fi
  "${cmd[@]}" "$@" --preset "$PRESET" --anno "$ANNO" --videos "$VIDEOS" --seed "$SEED" \
    || { echo "train.sh: stage '$name' failed" >&2; exit 1; }
  echo "$name $((SECONDS - t0))" >> "$OUT/times.txt"
}

run acp      --stage acp  --out "$OUT/acp"                                        # (1) action-classification pre-training on trimmed clips
run baseline --stage head --out "$OUT/baseline" --init "$OUT/acp/last.pt"         # (3) head at full fidelity on the ACP encoder: the baseline
run lofi     --stage lofi --out "$OUT/lofi" --init "$OUT/acp/last.pt" --cycle long # (2) encoder + head end to end, C-LoFi long cycle
run lofi-head --stage head --out "$OUT/lofi_head" --init "$OUT/lofi/last.pt"      # (3) head at full fidelity on the LoFi encoder

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("\n| encoder | mAP@0.5 | mAP@0.75 | mAP@0.95 | average |\n|---|---|---|---|---|")
for name, run in (("ACP (baseline)", "baseline"), ("ACP + LoFi", "lofi_head")):
    m = json.load(open(f"{out}/{run}/metrics.json"))
    print(f"| {name} | " + " | ".join(f"{100 * m[k]:.2f}" for k in ("mAP@0.50", "mAP@0.75", "mAP@0.95", "average-mAP")) + " |")
print("\nwall time per stage: " + ", ".join(f"{n} {s} s" for n, s in (l.split() for l in open(f"{out}/times.txt"))))
PY
