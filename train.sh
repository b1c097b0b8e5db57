#!/usr/bin/env bash
# The whole LoFi pipeline of the paper (Fig. 1), one commented line a stage.
#   bash train.sh                                    # synthetic videos, tiny preset, a CPU, minutes; stage 1 on a
#                                                    # synthetic Kinetics, once (data/pretrained/<recipe>)
#   bash train.sh --anno A.json --videos DIR --out RUNS --preset paper --nproc 4 [--seed S]
#   bash train.sh --anno A.json --store STORE ...    # frames from `python data.py prepare` (ActivityNet, HACS)
#   bash train.sh ... --init PATH|imagenet|none  # skip stage 1: PATH (a Kinetics TSM, the paper's ACP),
#                                            # ImageNet weights (ICP) or a random encoder are the baseline's
#   bash train.sh ... --acp-plus             # then stage 1 on the target's trimmed instances (ACP+; with
#                                            # --init none: from scratch on them alone)
#   bash train.sh --ablation [--seeds "0 1 2"] [--jobs 3]  # the paper's Tables 1-2 in miniature: stage 3 on every
#                                            # encoder, each seed its own data; --jobs: seeds side by side
#   bash train.sh ... --resume | --overwrite # continue the runs in --out, or start them again (else: refused)
# Prints mAP of the baseline (head on the classification-pretrained encoder) and of LoFi.
set -euo pipefail
here=$(pwd)
cd "$(dirname "$0")"

ANNO="" VIDEOS="" STORE="" OUT=runs PRESET=tiny NPROC=1 SEED=0 INIT="" ABLATION=0 SEEDS="0 1 2" JOBS=1 ACP_PLUS=0
RESUME=0 OVERWRITE=0
KINETICS_CLIPS=2000 KINETICS_EPOCHS=14   # the synthetic Kinetics pre-training: its clips and epochs
die() { echo "train.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --anno) ANNO=${2:?--anno needs a file}; shift 2 ;;
    --videos) VIDEOS=${2:?--videos needs a folder}; shift 2 ;;
    --store) STORE=${2:?--store needs a frame store folder}; shift 2 ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --preset) PRESET=${2:?--preset needs tiny or paper}; shift 2 ;;
    --nproc) NPROC=${2:?--nproc needs a number}; shift 2 ;;
    --seed) SEED=${2:?--seed needs a number}; shift 2 ;;
    --init) INIT=${2:?--init needs a checkpoint file, imagenet or none}; shift 2 ;;
    --acp-plus) ACP_PLUS=1; shift ;;
    --resume) RESUME=1; shift ;;
    --overwrite) OVERWRITE=1; shift ;;
    --ablation) ABLATION=1; shift ;;
    --seeds) SEEDS=${2:?--seeds needs a list such as "0 1 2"}; shift 2 ;;
    --jobs) JOBS=${2:?--jobs needs a number}; shift 2 ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see bash train.sh --help)" ;;
  esac
done
abs() { case "$1" in ""|/*) echo "$1" ;; *) echo "$here/$1" ;; esac; }   # paths are the caller's
ANNO=$(abs "$ANNO") VIDEOS=$(abs "$VIDEOS") STORE=$(abs "$STORE") OUT=$(abs "$OUT")
if [ -n "$INIT" ] && [ "$INIT" != imagenet ] && [ "$INIT" != none ]; then
  INIT=$(abs "$INIT")
  [ -f "$INIT" ] || die "encoder checkpoint '$INIT' not found (--init)"
fi
case "$PRESET" in tiny|paper) ;; *) die "--preset must be tiny or paper, not '$PRESET'" ;; esac
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, not '$NPROC'"
[[ "$SEED" =~ ^[0-9]+$ ]] || die "--seed must be a non-negative integer, not '$SEED'"
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer, not '$JOBS'"
[[ "$SEEDS" =~ ^[0-9]+( [0-9]+)*$ ]] || die "--seeds must be non-negative integers separated by spaces, not '$SEEDS'"
[ "$RESUME$OVERWRITE" != 11 ] || die "give --resume or --overwrite, not both"
USER_DATA=""
if [ -n "$ANNO$VIDEOS$STORE" ]; then
  USER_DATA=1
  [ -f "$ANNO" ] || die "annotation file '$ANNO' not found (--anno)"
  [ -z "$VIDEOS" ] || [ -z "$STORE" ] || die "give --videos or --store, not both"
  if [ -n "$STORE" ]; then
    [ -f "$STORE/store.json" ] || die "'$STORE' is not a frame store (--store; make one with python data.py prepare)"
  else
    [ -d "$VIDEOS" ] || die "video folder '$VIDEOS' not found (--videos)"
  fi
else
  SYNTH=data/synth$([ "$SEED" = 0 ] || echo "-seed$SEED")             # --seed S draws the videos too
  ANNO=$SYNTH/anno.json VIDEOS=$SYNTH/videos
fi
# A run is never overwritten unasked; --overwrite clears every stage's run first, so that a later --resume
# never continues a stage left from before (find does not follow the acp link into the pre-training cache).
held=$([ ! -d "$OUT" ] || find "$OUT" -mindepth 2 -maxdepth 3 \( -name last.pt -o -name log.jsonl \) | sort)
if [ -n "$held" ] && [ "$RESUME$OVERWRITE" = 00 ]; then
  die "'$OUT' holds runs ($(echo "$held" | wc -l) files, e.g. $(echo "$held" | head -1)):" \
    "--resume continues them, --overwrite starts them again"
fi
mkdir -p "$OUT" && exec 9>>"$OUT/lock"   # one train.sh a folder: fd 9's flock lasts as long as this shell
python -c 'import fcntl; fcntl.flock(9, fcntl.LOCK_EX | fcntl.LOCK_NB)' 2>/dev/null \
  || die "'$OUT': another train.sh is running in it (it holds $OUT/lock)"
[ "$OVERWRITE" = 0 ] || [ -z "$held" ] || echo "$held" | xargs -d '\n' rm -f
[ -n "$USER_DATA" ] || [ -f "$ANNO" ] || python data.py synth "$SYNTH" --seed "$SEED"   # synthetic dataset, once
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
: > "$OUT/times.txt"

run() {  # run NAME ARGS...: one stage, on NPROC processes, timed; stop at the first failure
  local name=$1 t0=$SECONDS a prev="" out="" again=(); shift
  for a in "$@"; do [ "$prev" != --out ] || out=$a; prev=$a; done
  [ "$RESUME" = 0 ] || [ ! -f "$out/last.pt" ] || again=(--resume)   # a stage not begun starts
  [ "$RESUME" = 0 ] || [ -f "$out/last.pt" ] || [ ! -f "$out/log.jsonl" ] || again=(--overwrite)   # (no checkpoint)
  echo "== stage $name"
  if [ "$NPROC" -gt 1 ]; then cmd=(torchrun --standalone --nproc_per_node="$NPROC" lofi.py); else cmd=(python lofi.py); fi
  # bf16 runs the tiny preset 1.4-2.5x faster on CPUs with AVX512-BF16 (README)
  local src=(--videos "$VIDEOS"); [ -z "$STORE" ] || src=(--store "$STORE")
  "${cmd[@]}" "$@" "${again[@]}" --preset "$PRESET" --anno "$ANNO" "${src[@]}" --seed "$SEED" $([ "$PRESET" = tiny ] && echo --amp) 9>&- \
    || { echo "train.sh: stage '$name' failed" >&2; exit 1; }
  echo "$name $((SECONDS - t0))" >> "$OUT/times.txt"
}

pretrain() {  # (1) ACP on a synthetic Kinetics (no target class in it), once a recipe, for every --seed -> PRE
  PRE=data/pretrained/acp_kinetics${KINETICS_CLIPS}-seed0_${PRESET}_e${KINETICS_EPOCHS}
  [ -f data/kinetics/anno.json ] || python data.py synth data/kinetics --shape kinetics --videos "$KINETICS_CLIPS"
  if [ ! -f "$PRE/done" ]; then
    # RESUME=1: a cache is always continued, or started again where no checkpoint was written
    RESUME=1 SEED=0 ANNO=data/kinetics/anno.json VIDEOS=data/kinetics/videos STORE="" run pretrain --stage acp \
      --out "$PRE" --init none --epochs "$KINETICS_EPOCHS" && touch "$PRE/done"
  fi
}

stage1() {  # the baseline's encoder -> INIT (and $OUT/stage1: the run whose clip accuracy is printed)
  if [ -z "$INIT" ] && [ -z "$USER_DATA" ]; then
    pretrain && INIT=$PRE/last.pt && echo "$PRE" > "$OUT/stage1"
    [ -d "$OUT/acp" ] && [ ! -L "$OUT/acp" ] || ln -sfn "$(realpath "$PRE")" "$OUT/acp"   # lofi.py's default --init
  fi
  if [ -z "$INIT" ] || [ "$ACP_PLUS" = 1 ]; then    # (1) the target's trimmed instances: ACP+, or from scratch
    [ ! -L "$OUT/acp" ] || rm "$OUT/acp"            # (not into the pre-trained encoder's folder)
    run acp --stage acp --out "$OUT/acp" --init "${INIT:-none}"
    INIT=$OUT/acp/last.pt && echo "$OUT/acp" > "$OUT/stage1"
  fi
}

ablate() {  # ablate SEED: Tables 1-2 in miniature for one seed, in $BASE/seed$SEED: one stage 2 per row, then stage 3
  SEED=$1 OUT=$BASE/seed$1 INIT=$INIT0
  if [ -z "$USER_DATA" ]; then                                      # each seed draws its synthetic set, as train.sh --seed
    SYNTH=data/synth$([ "$SEED" = 0 ] || echo "-seed$SEED") && ANNO=$SYNTH/anno.json VIDEOS=$SYNTH/videos
    [ -f "$ANNO" ] || python data.py synth "$SYNTH" --seed "$SEED"
  fi
  mkdir -p "$OUT"
  : > "$OUT/times.txt"
  rm -f "$OUT/stage1"
  stage1
  run head-acp --stage head --out "$OUT/head-acp" --init "$INIT"                                              # ACP (the baseline)
  SCORES=(--video-scores "$OUT/head-acp/video_scores.json")                            # one classifier for all rows
  for row in long short; do                                                                     # C-LoFi, long and short cycle
    run "lofi-c$row" --stage lofi --out "$OUT/lofi-c$row" --init "$INIT" --cycle "$row"
    run "head-c$row" --stage head "${SCORES[@]}" --out "$OUT/head-c$row" --init "$OUT/lofi-c$row/last.pt"
  done
  for row in s t st full; do                                                                    # S-, T-, ST-LoFi; full fidelity end to end
    run "lofi-$row" --stage lofi --out "$OUT/lofi-$row" --init "$INIT" --fidelity "$row"
    run "head-$row" --stage head "${SCORES[@]}" --out "$OUT/head-$row" --init "$OUT/lofi-$row/last.pt"
  done
  run head-clong-bnrecal --stage head "${SCORES[@]}" --out "$OUT/head-clong-bnrecal" --init "$OUT/lofi-clong/last.pt" --bn-recal 32
  run head-clong-lrsearch --stage head "${SCORES[@]}" --out "$OUT/head-clong-lrsearch" --init "$OUT/lofi-clong/last.pt" --lr-search
  run head-acp-lrsearch --stage head "${SCORES[@]}" --out "$OUT/head-acp-lrsearch" --init "$INIT" --lr-search
}

if [ "$ABLATION" = 1 ]; then
  BASE=$OUT INIT0=$INIT
  [ -n "$INIT" ] || [ -n "$USER_DATA" ] || pretrain   # once, before seeds run side by side
  if [ "$JOBS" = 1 ]; then
    for S in $SEEDS; do ablate "$S"; done
  else   # seeds side by side, the cores split between them; each seed's log in its folder
    export OMP_NUM_THREADS=$(( ($(nproc) + JOBS - 1) / JOBS ))
    for S in $SEEDS; do
      while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
      mkdir -p "$BASE/seed$S"
      rm -f "$BASE/seed$S/done"
      ( ablate "$S" && touch "$BASE/seed$S/done" ) > "$BASE/seed$S/train.log" 2>&1 &
      echo "seed $S: log in $BASE/seed$S/train.log"
    done
    wait
    for S in $SEEDS; do
      [ -f "$BASE/seed$S/done" ] || die "seed $S failed: see $BASE/seed$S/train.log"
    done
  fi
  python - "$BASE" $SEEDS <<'PY' | tee "$BASE/ablation.md"
import json, os, sys
import numpy as np
import evaluate
base, seeds = sys.argv[1], sys.argv[2:]
rows = [("ACP (baseline)", "head-acp", ["pretrain", "acp", "head-acp"]),
        ("ACP, lr search", "head-acp-lrsearch", ["pretrain", "acp", "head-acp-lrsearch"]),
        ("S-LoFi", "head-s", ["lofi-s", "head-s"]), ("T-LoFi", "head-t", ["lofi-t", "head-t"]),
        ("ST-LoFi", "head-st", ["lofi-st", "head-st"]), ("C-LoFi short", "head-cshort", ["lofi-cshort", "head-cshort"]),
        ("C-LoFi long", "head-clong", ["lofi-clong", "head-clong"]),
        ("C-LoFi long, BN re-estimated", "head-clong-bnrecal", ["lofi-clong", "head-clong-bnrecal"]),
        ("C-LoFi long, lr search", "head-clong-lrsearch", ["lofi-clong", "head-clong-lrsearch"]),
        ("full fidelity end to end", "head-full", ["lofi-full", "head-full"])]
stage1 = [open(f"{base}/seed{s}/stage1").read().strip() for s in seeds if os.path.exists(f"{base}/seed{s}/stage1")]
acc = [[json.loads(l)["val_acc"] for l in open(f"{d}/log.jsonl")][-1] for d in stage1]
print(f"\n{len(seeds)} seeds ({' '.join(seeds)}), each its own data and training; mean ± std (%)"
      + (f"; stage-1 held-out clip accuracy {' / '.join(f'{a:.3f}' for a in acc)}" if acc else "")
      + "; time = the row's stage 2 + stage 3 (stage 1 + 3 for ACP), mean seconds a seed")
print("| encoder for stage 3 | mAP@0.5 | mAP@0.75 | mAP@0.95 | average mAP | average mAP per seed | proposal AUC | time (s) |")
print("|---|---|---|---|---|---|---|---|")
for name, run, stages in rows:
    folders = [f"{base}/seed{s}/{run}" for s in seeds]
    m = np.array([[100 * json.load(open(f"{d}/metrics.json"))[k] for k in ("mAP@0.50", "mAP@0.75", "mAP@0.95", "average-mAP")]
                  for d in folders])                                                                        # (S, 4)
    auc = [evaluate.proposal_recall(json.load(open(f"{d}/args.json"))["anno"], f"{d}/detections.json")["AUC"] for d in folders]
    times = [dict(l.split() for l in open(f"{base}/seed{s}/times.txt")) for s in seeds]
    t = np.mean([sum(int(ts.get(st, 0)) for st in stages) for ts in times])
    print(f"| {name} | " + " | ".join(f"{a:.2f} ± {b:.2f}" for a, b in zip(m.mean(0), m.std(0)))
          + " | " + " / ".join(f"{x:.2f}" for x in m[:, 3]) + f" | {np.mean(auc):.2f} ± {np.std(auc):.2f} | {t:.0f} |")
PY
  exit 0
fi

rm -f "$OUT/stage1"
stage1   # (1) the encoder
run baseline --stage head --out "$OUT/baseline" --init "$INIT"                      # (3) head at full fidelity on the stage-1 encoder: the baseline
SCORES=(--video-scores "$OUT/baseline/video_scores.json")   # its video classes for both rows (as G-TAD takes CUHK's)
run lofi     --stage lofi --out "$OUT/lofi" --init "$INIT" --cycle long              # (2) encoder + head end to end, C-LoFi long cycle
run lofi-head --stage head "${SCORES[@]}" --out "$OUT/lofi_head" --init "$OUT/lofi/last.pt"      # (3) head at full fidelity on the LoFi encoder

python - "$OUT" <<'PY'
import json, os, sys
import evaluate
out = sys.argv[1]
if os.path.exists(f"{out}/stage1"):
    stage1 = open(f"{out}/stage1").read().strip()
    acc = [json.loads(l) for l in open(f"{stage1}/log.jsonl")][-1]["val_acc"]
    print(f"\nstage 1 ({stage1}): held-out clip accuracy {acc:.3f}")
print("\n| encoder | mAP@0.5 | mAP@0.75 | mAP@0.95 | average | proposal AUC |\n|---|---|---|---|---|---|")
for name, run in (("ACP (baseline)", "baseline"), ("ACP + LoFi", "lofi_head")):
    m = json.load(open(f"{out}/{run}/metrics.json"))
    auc = evaluate.proposal_recall(json.load(open(f"{out}/{run}/args.json"))["anno"], f"{out}/{run}/detections.json")["AUC"]
    print(f"| {name} | " + " | ".join(f"{100 * m[k]:.2f}" for k in ("mAP@0.50", "mAP@0.75", "mAP@0.95", "average-mAP"))
          + f" | {auc:.2f} |")
print("\nwall time per stage: " + ", ".join(f"{n} {s} s" for n, s in (l.split() for l in open(f"{out}/times.txt"))))
PY
