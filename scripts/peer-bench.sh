#!/usr/bin/env bash
# PyTorch (+ transformers, PEFT) at exactly the shapes of our benchmarks, on this machine, written
# into our result files beside our figures (bench/peer/*.py say what is timed and how).
#
#   scripts/peer-bench.sh                    # add PyTorch's figures to the existing records
#   scripts/peer-bench.sh --with-ours        # re-run our benchmarks, then PyTorch's: one run
#   scripts/peer-bench.sh --only attention   # a subset: attention, ffn, steps, layers, generate,
#                                            # predict, demo, accuracy
#                                            # (repeatable, or comma-separated); default:
#                                            # attention,ffn,steps
#   scripts/peer-bench.sh --quick            # small shapes, on a temporary copy of the results
#                                            # (pipeline check, ~5 min; bench/results untouched)
#
# Parts and files (bench/results/): attention -> attention.json, ffn -> ffn.json, steps ->
# finetune-speed.json, finetune-speed-accuracy-setting.json and finetune-speed-bf16.json, layers -> lora-linear.json,
# linear-cross-entropy.json and norm-activation.json, generate -> generate.json, predict ->
# predict.json, accuracy -> accuracy.json (each record gets
# torch_* fields, ratios and peer_details; each file a top-level `peer` object). demo: PyTorch's full
# fine-tuning step at the demo's setting, printed (with --with-ours: scripts/demo.sh, which times
# SPT, dense and PyTorch in one run). accuracy: transformers full fine-tuning and PEFT LoRA of
# MiniLM on Rotten Tomatoes for seeds 42-45 on spt-train's rows, batches and schedule, new records
# in accuracy.json (with --with-ours, scripts/accuracy-runs.py first re-runs our headline rows;
# both take about an hour on 2 cores). Our benchmarks are re-run with the commands their files
# record (`command`). Timings taken while something else runs (a cargo build) are disturbed,
# PyTorch's more than ours: each record keeps the load average before and after.
#
# The Python environment .venv-peer/ (git-ignored) is made on first use with the exact versions
# of bench/peer/requirements.txt, from PyPI (torch's Linux wheel there pulls the CUDA libraries
# too: about 6 GB on disk, unused here).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV=.venv-peer
REQ=bench/peer/requirements.txt
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
log() { echo "peer-bench: $*" >&2; }

WITH_OURS=0
QUICK=0
PARTS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --with-ours) WITH_OURS=1 ;;
    --quick) QUICK=1 ;;
    --only)
      [[ $# -ge 2 ]] || { log "--only needs a part"; exit 2; }
      IFS=, read -ra more <<<"$2"; PARTS+=("${more[@]}"); shift ;;
    --only=*) IFS=, read -ra more <<<"${1#--only=}"; PARTS+=("${more[@]}") ;;
    -h|--help) usage; exit 0 ;;
    *) log "unknown argument '$1'"; usage >&2; exit 2 ;;
  esac
  shift
done
[[ ${#PARTS[@]} -gt 0 ]] || PARTS=(attention ffn steps)
for p in "${PARTS[@]}"; do
  case "$p" in attention|ffn|steps|layers|generate|predict|demo|accuracy) ;; *) log "unknown part '$p' (attention, ffn, steps, layers, generate, predict, demo, accuracy)"; exit 2 ;; esac
done
want() { local p; for p in "${PARTS[@]}"; do [[ "$p" == "$1" ]] && return 0; done; return 1; }

# --- the environment: made once, re-made when the requirements change ---------------------
setup_venv() {
  local stamp="$VENV/.requirements.sha256" want_sum
  want_sum="$(cat "$REQ" <(python3 --version) | sha256sum | cut -d' ' -f1)"
  if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want_sum" ]]; then
    return 0
  fi
  log "setting up $VENV from $REQ (first time: a few minutes)"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -r "$REQ"
  "$VENV/bin/python" -c 'import torch, transformers, peft, safetensors, numpy' \
    || { log "the environment does not import; remove $VENV and retry"; exit 1; }
  echo "$want_sum" >"$stamp"
}
setup_venv
PY="$ROOT/$VENV/bin/python"

if want steps || want demo || want predict || want accuracy; then
  assets=(minilm)
  { want demo || want predict || want accuracy; } && assets+=(rt)
  if [[ ! -f third_party/all-MiniLM-L6-v2/model.safetensors ]] || { [[ ${#assets[@]} -gt 1 ]] && [[ ! -f data/rt/rotten_tomatoes_corpus_full.csv ]]; }; then
    log "fetching ${assets[*]}"
    scripts/fetch-assets.sh "${assets[@]}"
  fi
fi

# --- where results go ------------------------------------------------------------------------
RESULTS=bench/results
if [[ $QUICK == 1 ]] && { want attention || want ffn || want steps || want layers || want generate || want predict; }; then
  RESULTS="$(mktemp -d "${TMPDIR:-/tmp}/peer-bench.XXXXXX")"
  cp bench/results/{attention,ffn,finetune-speed,finetune-speed-accuracy-setting,generate,linear-cross-entropy,lora-linear,norm-activation,predict}.json "$RESULTS/"
  log "quick mode: small shapes, results in the copy $RESULTS (bench/results untouched)"
fi

# The commands recorded in a result file's `command` field (a string or a list), one a line.
commands_of() {
  python3 -c 'import json,sys; c=json.load(open(sys.argv[1])).get("command") or []; print("\n".join([c] if isinstance(c, str) else c))' "$1"
}

run_ours() { # part
  local part=$1 f cmd
  if [[ $part == steps ]]; then
    log "building spt-train (release)"
    cargo build --release -q -p spt-train --bin spt-train
    if [[ $QUICK == 1 ]]; then
      # Small shapes, into the copy (our attention and FFN benches always write bench/results).
      target/release/spt-train -q bench --model third_party/all-MiniLM-L6-v2 --batch-size 2 --seq-len 64 \
        --steps 2 --warmup 1 --output "$RESULTS/finetune-speed.json"
      target/release/spt-train -q bench --model bench/configs/gpt2-small --batch-size 2 --seq-len 64 \
        --steps 2 --warmup 1 --output "$RESULTS/finetune-speed.json" --append
      rm -f "$RESULTS/finetune-speed-accuracy-setting.json"
      return
    fi
    for f in bench/results/finetune-speed.json bench/results/finetune-speed-accuracy-setting.json \
      bench/results/finetune-speed-bf16.json; do
      [[ -f $f ]] || continue
      mapfile -t cmds < <(commands_of "$f")  # read before the first command rewrites the file
      for cmd in "${cmds[@]}"; do
        log "ours: $cmd"
        bash -c "$cmd"
      done
    done
  elif [[ $QUICK == 1 ]]; then
    log "quick mode: our $part benchmark is not re-run (it writes into bench/results)"
  else
    # The layers bench writes three files; each records its one command.
    f="bench/results/$part.json"
    [[ $part == layers ]] && f=bench/results/lora-linear.json
    cmd="$(commands_of "$f")"
    log "ours: $cmd"
    bash -c "$cmd"
  fi
}

log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for part in attention ffn steps layers generate predict; do
  want "$part" || continue
  [[ $WITH_OURS == 1 ]] && run_ours "$part"
  quick_flag=()
  [[ $QUICK == 1 ]] && quick_flag=(--quick)
  "$PY" bench/peer/run.py --results "$RESULTS" "${quick_flag[@]}" "$part"
done
if want demo; then
  if [[ $WITH_OURS == 1 && $QUICK == 0 ]]; then
    scripts/demo.sh
  else
    steps=()
    [[ $QUICK == 1 ]] && steps=(--steps 3 --warmup 1)
    line="$("$PY" bench/peer/demo_step.py "${steps[@]}" | tail -n 1)"
    python3 - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"PyTorch full fine-tuning of MiniLM-L6 at the demo's setting (batch 16, max length 64, "
      f"Rotten Tomatoes batches): {r['median_step_s']:.3f} s/step, measured now (median of "
      f"{r['steps']} steps after {r['warmup']}; torch {r['torch']}, {r['threads']} threads; "
      f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB)")
PY
  fi
fi
if want accuracy; then
  if [[ $QUICK == 1 ]]; then
    log "quick mode: the accuracy part is not run (an epoch per run)"
  else
    if [[ $WITH_OURS == 1 ]]; then
      cargo build --release -q -p spt-train --bin spt-train
      python3 scripts/accuracy-runs.py
    fi
    # The README's rows: full fine-tuning, and LoRA with the pooler trained (our lora default).
    "$PY" bench/peer/accuracy.py --mode full
    "$PY" bench/peer/accuracy.py --mode lora --modules-to-save pooler
  fi
fi
log "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
[[ $RESULTS != bench/results ]] && log "quick results: $RESULTS"
exit 0
