#!/usr/bin/env bash
# Attention mass captured by per-query and block-mode key selection on real activations
# (crates/spt-train/examples/attention_fidelity.rs), for both models of issue #18:
# - all-MiniLM-L6-v2 on Rotten Tomatoes, L = 512;
# - a GPT-2 (4 layers, 256 wide, 4 heads, 1024 positions; no GPT-2 weights are reachable here)
#   trained from random weights on SOTU 1790-1949 at block size 1024 (300 steps, batch 2, about
#   8 minutes on 2 cores; kept in $OUT and reused), on SOTU addresses from 2000 on, L = 1024,
#   causal.
# Writes bench/results/attention-fidelity.json.
#
#   scripts/attention-fidelity.sh            # FIDELITY_OUT=target/fidelity by default
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${FIDELITY_OUT:-target/fidelity}"
scripts/fetch-assets.sh minilm rt gpt2-tokenizer sotu
cargo build --release -q -p spt-train --bin spt-train --example attention_fidelity
BIN=target/release/spt-train
if [[ ! -f "$OUT/gpt2/model.safetensors" ]]; then
  mkdir -p "$OUT/init"
  # gpt2-mini with 1024 positions.
  python3 - bench/configs/gpt2-mini/config.json > "$OUT/init/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["n_positions"] = c["n_ctx"] = 1024
print(json.dumps(c, indent=2))
PY
  train=()
  for f in data/sotu/1[78]*.txt data/sotu/19[0-4]*.txt; do train+=(--train-file "$f"); done
  echo "attention-fidelity: training the GPT-2 on $(( ${#train[@]} / 2 )) SOTU addresses (1790-1949)" >&2
  "$BIN" -q finetune --model "$OUT/init" --tokenizer third_party/gpt2-tokenizer --random-init \
    --task lm "${train[@]}" --validation-file data/sotu/1950_harry_s_truman_d.txt --block-size 1024 \
    --batch-size 2 --max-steps 300 --lr 1e-3 --schedule cosine --warmup-ratio 0.05 --mode dense \
    --seed 42 --output-dir "$OUT/run" --overwrite --no-progress | tail -n 1
  "$BIN" -q export --model "$OUT/init" \
    --checkpoint "$OUT/run" --out "$OUT/gpt2" --overwrite
fi
target/release/examples/attention_fidelity --gpt2 "$OUT/gpt2"
