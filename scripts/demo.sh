#!/usr/bin/env bash
# The README's main job: fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes (fresh vs rotten, split by
# movie, seeded) with SPT for one epoch, and print validation accuracy and median time per step
# beside dense full fine-tuning of the same epoch: the saved figure in
# bench/results/demo-dense.json (measured by this script with DEMO_DENSE=run), or a fresh run.
#
#   scripts/demo.sh                    # fetch assets if missing, build release, SPT, saved dense
#   DEMO_DENSE=run scripts/demo.sh     # also train dense here (about 3x the SPT time)
#   STEPS=120 scripts/demo.sh          # a bounded number of steps instead of one epoch
#
# Designed to finish in <= 15 minutes on a 2-core machine from a fresh clone (release build
# ~5 min, SPT epoch ~5 min).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STEPS="${STEPS:-}"
BATCH="${BATCH:-16}"
MAXLEN="${MAXLEN:-64}"
SEED="${SEED:-42}"
OUT="${DEMO_OUT:-target/demo}"
MODEL=third_party/all-MiniLM-L6-v2
DATA=data/rt/rotten_tomatoes_corpus_full.csv

if [[ ! -f "$MODEL/model.safetensors" || ! -f "$DATA" ]]; then
  echo "demo: fetching assets (MiniLM, Rotten Tomatoes)" >&2
  scripts/fetch-assets.sh minilm rt
fi

echo "demo: building spt-train (release)" >&2
cargo build --release -q -p spt-train --bin spt-train
BIN="${CARGO_TARGET_DIR:-target}/release/spt-train"

if [[ -n "$STEPS" ]]; then LENGTH=(--max-steps "$STEPS"); WHAT="$STEPS steps"; else LENGTH=(--epochs 1); WHAT="1 epoch"; fi

run() { # mode lr
  local mode=$1
  "$BIN" -q finetune --model "$MODEL" --task classify --train-file "$DATA" \
    --text-column text --label-column category --drop-label plot \
    --validation-split 0.1 --split-by movie_name --seed "$SEED" \
    --max-length "$MAXLEN" --batch-size "$BATCH" "${LENGTH[@]}" \
    --lr "$2" --warmup-ratio 0.1 --schedule linear \
    --mode "$mode" --attn-k-fraction 0.5 --ffn-blocks 8 --ffn-top-k 4 --lora-rank 8 --lora-alpha 16 \
    --output-dir "$OUT/$mode" --overwrite --no-progress
}

# finetune prints one JSON line at the end: final eval, median step time, parameter counts.
summary() { # line
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); e=r.get("eval") or {}; print(json.dumps({"accuracy": e.get("accuracy"), "macro_f1": e.get("macro_f1"), "median_step_s": r.get("median_step_s"), "trainable_params": r.get("trainable_params"), "total_params": r.get("total_params")}))' "$1"
}

echo "demo: spt fine-tuning, $WHAT" >&2
t0=$(date +%s); SPT=$(summary "$(run spt 1e-3 | tail -n 1)"); t1=$(date +%s)
if [[ "${DEMO_DENSE:-saved}" == saved && -z "$STEPS" ]]; then
  DENSE=$(python3 -c 'import json;d=json.load(open("bench/results/demo-dense.json"));print(json.dumps(d))')
  WHERE="saved (bench/results/demo-dense.json)"
else
  echo "demo: dense fine-tuning, $WHAT" >&2
  DENSE=$(summary "$(run dense 1e-4 | tail -n 1)"); WHERE="this run"
fi
t2=$(date +%s)

python3 - "$SPT" "$DENSE" "$WHERE" "$WHAT" <<'PY'
import json, sys
spt, dense, where, what = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
f = lambda x, p: "-" if x is None else p.format(x)
print(f"\nMiniLM-L6 on Rotten Tomatoes (fresh/rotten, split by movie), {what}, validation:")
print(f"{'mode':<8}{'accuracy':>10}{'macro-F1':>10}{'s/step':>10}")
for name, r in [("spt", spt), ("dense", dense)]:
    print(f"{name:<8}{f(r['accuracy'],'{:.4f}'):>10}{f(r['macro_f1'],'{:.4f}'):>10}{f(r['median_step_s'],'{:.3f}'):>10}")
if spt["median_step_s"] and dense["median_step_s"]:
    print(f"spt step time: {dense['median_step_s']/spt['median_step_s']:.2f}x faster than dense (dense: {where})")
PY
echo "demo: training wall time: spt $((t1 - t0)) s, total $((t2 - t0)) s" >&2
