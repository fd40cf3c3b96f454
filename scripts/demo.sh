#!/usr/bin/env bash
# The README's main job: fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes (fresh vs rotten, split by
# movie, seeded) with SPT for one epoch, and print validation accuracy and time per step beside
# dense full fine-tuning, every step time measured on this machine in this run:
#
# - SPT: one epoch here (accuracy and s/step measured now);
# - dense: a bounded run here on the same data, seed, batch size and max length (DENSE_STEPS
#   steps, default 45, about a minute), for its s/step; its accuracy is the one saved from a full
#   epoch in bench/results/demo-dense.json (labelled with that run's date);
# - PyTorch (when .venv-peer/ exists: scripts/peer-bench.sh makes it): transformers'
#   BertForSequenceClassification full fine-tuning on batches of the same CSV, same batch size
#   and max length (bench/peer/demo_step.py), for its s/step.
#
# Each s/step is the median of the steps after the first WARMUP (default 5).
#
#   scripts/demo.sh                    # fetch assets if missing, build release, run the above
#   DEMO_DENSE=run scripts/demo.sh     # train dense for the whole epoch too (about 8 more min)
#   STEPS=120 scripts/demo.sh          # a bounded number of SPT steps instead of one epoch
#   DEMO_RECORD=bench/results/demo.json scripts/demo.sh   # also save the figures (docs/results)
#
# Designed to finish in <= 15 minutes on a 2-core machine from a fresh clone (release build
# ~5 min, SPT epoch ~5 min, dense and PyTorch steps ~1 min each).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STEPS="${STEPS:-}"
BATCH="${BATCH:-16}"
MAXLEN="${MAXLEN:-64}"
SEED="${SEED:-42}"
DENSE_STEPS="${DENSE_STEPS:-45}"
WARMUP="${WARMUP:-5}"
DEMO_DENSE="${DEMO_DENSE:-steps}"
OUT="${DEMO_OUT:-target/demo}"
MODEL=third_party/all-MiniLM-L6-v2
DATA=data/rt/rotten_tomatoes_corpus_full.csv
SAVED=bench/results/demo-dense.json
PEER_PY=.venv-peer/bin/python

case "$DEMO_DENSE" in
  steps|run) ;;
  *) echo "demo: DEMO_DENSE is '$DEMO_DENSE'; expected 'steps' (default) or 'run'" >&2; exit 2 ;;
esac
if (( DENSE_STEPS <= WARMUP )); then
  echo "demo: DENSE_STEPS ($DENSE_STEPS) must be larger than WARMUP ($WARMUP)" >&2; exit 2
fi

if [[ ! -f "$MODEL/model.safetensors" || ! -f "$DATA" ]]; then
  echo "demo: fetching assets (MiniLM, Rotten Tomatoes)" >&2
  scripts/fetch-assets.sh minilm rt
fi

echo "demo: building spt-train (release)" >&2
cargo build --release -q -p spt-train --bin spt-train
BIN="${CARGO_TARGET_DIR:-target}/release/spt-train"

if [[ -n "$STEPS" ]]; then SPT_LEN=(--max-steps "$STEPS"); WHAT="$STEPS steps"; else SPT_LEN=(--epochs 1); WHAT="1 epoch"; fi

run() { # mode lr length-args...
  local mode=$1 lr=$2 preset=()
  shift 2
  # spt: the default recipe, spelled out (dense has no adapters to size).
  [[ $mode == spt ]] && preset=(--preset fast --lora-rank 8 --lora-alpha 16)
  "$BIN" -q finetune --model "$MODEL" --task classify --train-file "$DATA" \
    --text-column text --label-column category --drop-label plot \
    --validation-split 0.1 --split-by movie_name --seed "$SEED" \
    --max-length "$MAXLEN" --batch-size "$BATCH" "$@" \
    --lr "$lr" --warmup-ratio 0.1 --schedule linear \
    --mode "$mode" "${preset[@]}" \
    --output-dir "$OUT/$mode" --overwrite --no-progress
}

# finetune prints one JSON line at the end: final eval, step times, parameter counts. Keeps the
# eval and the median of the steps after the warm-up (all steps if the line has no step times).
summary() { # line
  python3 - "$1" "$WARMUP" <<'PY'
import json, statistics, sys
r, warmup = json.loads(sys.argv[1]), int(sys.argv[2])
e = r.get("eval") or {}
times = r.get("step_times_s") or []
timed = times[warmup:] if len(times) > warmup else []
print(json.dumps({
    "accuracy": e.get("accuracy"), "macro_f1": e.get("macro_f1"),
    "median_step_s": statistics.median(timed) if timed else r.get("median_step_s"),
    "steps": r.get("step"), "timed_from": warmup + 1 if timed else 1,
}))
PY
}

t0=$(date +%s)
echo "demo: spt fine-tuning, $WHAT" >&2
SPT=$(summary "$(run spt 1e-3 "${SPT_LEN[@]}" | tail -n 1)")
t1=$(date +%s)
if [[ "$DEMO_DENSE" == run ]]; then
  echo "demo: dense fine-tuning, $WHAT" >&2
  DENSE=$(summary "$(run dense 1e-4 "${SPT_LEN[@]}" | tail -n 1)")
else
  echo "demo: dense fine-tuning, $DENSE_STEPS steps (step time only)" >&2
  DENSE=$(summary "$(run dense 1e-4 --max-steps "$DENSE_STEPS" | tail -n 1)")
fi
t2=$(date +%s)
TORCH=null
if [[ -x "$PEER_PY" ]]; then
  echo "demo: PyTorch full fine-tuning, $((DENSE_STEPS - WARMUP)) steps after $WARMUP (step time only)" >&2
  TORCH=$("$PEER_PY" bench/peer/demo_step.py --batch-size "$BATCH" --max-length "$MAXLEN" --seed "$SEED" \
    --steps $((DENSE_STEPS - WARMUP)) --warmup "$WARMUP" | tail -n 1) || {
    echo "demo: the PyTorch timing failed (see above); going on without it" >&2
    TORCH=null
  }
fi
t3=$(date +%s)

python3 - "$SPT" "$DENSE" "$TORCH" "$DEMO_DENSE" "$WHAT" "$SAVED" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, os, re, sys
spt, dense, torch = (json.loads(a) for a in sys.argv[1:4])
dense_mode, what, saved_path, load = sys.argv[4:8]
saved = json.load(open(saved_path))
date = saved.get("measured") or (re.search(r"\d{4}-\d{2}-\d{2}", saved.get("note", "")) or [None])[0]
saved_from = f"saved from a full run ({saved.get('epochs', 1)} epoch) on {date or 'an unknown date'}"
if dense_mode == "steps":  # accuracy of the saved full run, step time of this run's bounded one
    dense = dict(dense, accuracy=saved.get("accuracy"), macro_f1=saved.get("macro_f1"))

f = lambda x, p: "-" if x is None else p.format(x)
def steps_of(r):
    return f"median of steps {r['timed_from']}-{r['steps']}"
rows = [
    ("spt", spt, f"accuracy and s/step measured now ({what}; s/step: {steps_of(spt)})"),
    ("dense", dense,
     f"accuracy measured now ({what}); s/step measured now ({steps_of(dense)})" if dense_mode == "run" else
     f"accuracy {saved_from}; s/step measured now ({steps_of(dense)}; the saved run's: "
     f"{f(saved.get('median_step_s'), '{:.3f}')} on its machine)"),
]
if torch:
    rows.append(("pytorch", {"accuracy": None, "macro_f1": None, "median_step_s": torch["median_step_s"]},
                 f"s/step measured now (torch {torch['torch']}, transformers {torch['transformers']}, "
                 f"full fine-tuning, median of {torch['steps']} steps after {torch['warmup']}; no accuracy: "
                 f"timing only)"))
print(f"\nMiniLM-L6 on Rotten Tomatoes (fresh/rotten, split by movie), validation; this machine "
      f"(load average {load}):")
print(f"{'mode':<8}{'accuracy':>10}{'macro-F1':>10}{'s/step':>10}   where from")
for name, r, src in rows:
    print(f"{name:<8}{f(r['accuracy'], '{:.4f}'):>10}{f(r['macro_f1'], '{:.4f}'):>10}"
          f"{f(r['median_step_s'], '{:.3f}'):>10}   {src}")
s = spt["median_step_s"]
for name, r, label in [("dense", dense, "dense (candle, spt-train --mode dense)"),
                       ("pytorch", torch, "PyTorch full fine-tuning")]:
    if s and r and r.get("median_step_s"):
        ratio = r["median_step_s"] / s
        how = f"{ratio:.2f}x faster than" if ratio >= 1 else f"{1 / ratio:.2f}x slower than"
        print(f"spt step time: {how} {label} (both measured now, on this machine)")
if not torch:
    print("PyTorch: not measured (no .venv-peer/; scripts/peer-bench.sh --only demo sets it up)")
record = os.environ.get("DEMO_RECORD")
if record:  # the figures of this run, for docs/results (scripts/results-md.py renders them)
    import datetime
    rec = {
        "note": "scripts/demo.sh: every s/step measured in this run on this machine; dense accuracy "
                + ("measured now" if dense_mode == "run" else saved_from),
        "measured": datetime.date.today().isoformat(), "loadavg": load, "what": what,
        "spt": spt, "dense": dense, "torch": torch,
        "dense_mode": dense_mode,
    }
    tmp = record + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(rec, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, record)
    print(f"demo: figures written to {record}")
PY
echo "demo: wall time: spt $((t1 - t0)) s, dense $((t2 - t1)) s, pytorch $((t3 - t2)) s, total $((t3 - t0)) s" >&2
