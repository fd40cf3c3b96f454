#!/usr/bin/env bash
# Runs on the GPU machine (H200, driver 580 / CUDA 13.0; no cargo there), from the bundle that
# scripts/gpu-build.sh made (gpu-bundle/), or from the repo root after a gpu-build:
#   1. every CUDA-vs-CPU parity test, ignored ones included (forward and backward; f32 within
#      1e-4, bf16 within 3e-2·(1 + |cpu|) and 2 % of the tensor's max |cpu| of the f32 CPU op on
#      bf16-exact inputs);
#   2. the benchmark, bf16 then f32: sparse attention fwd+bwd vs dense at L = 1024, 4096, 16384
#      (H=16, d=64), in bf16 also the tensor-core kernels (dense flash, block-sparse with device
#      block selection), routed vs dense FFN;
#   3. PyTorch SDPA (flash / efficient) at the same shapes, for comparison;
#   4. with train.tar.gz (gpu-build.sh --with-train): `spt-train bench --device cuda`, dense vs
#      LoRA vs SPT training steps on MiniLM (B8×L512) and GPT-2 small (B4×L512), random weights
#      of the real shapes, into finetune-speed-gpu.json;
#   5. with train.tar.gz: gpu-train-parity.py, the same 8-step fine-tuning of the tiny fixture
#      models on the CPU and on CUDA (dense, LoRA, SPT), losses compared, into train-parity.json.
# Writes OUT_DIR (default ./gpu-results): parity.log, run.log (nvidia-smi and steps 2-5),
# gpu_bench.json, sdpa.json, summary.json, target.json (issue 19's targets against SDPA at L = 4096 and 16384), and
# with steps 4-5 finetune-speed-gpu.json and train-parity.json.
# Budget: the timeouts add up to 580 s at worst (parity: tests start within 100 s, the last may
# run 40; then 120 + 60 + 2·80 + 100 s; 320 s without steps 4-5), which only hung steps reach;
# give a remote runner 600 s. At most 8 output files, so that a remote runner with a small return limit gets them all
# (a killed step's temporary is removed at the end).
# Exit status: non-zero if a parity test or a CPU-vs-CUDA fine-tuning case failed, or a step
# could not run.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [[ -f "$here/bin.tar.gz" ]]; then B="$here"
elif [[ -f "$here/../gpu-bundle/bin.tar.gz" ]]; then B="$(cd "$here/../gpu-bundle" && pwd)"
else echo "gpu-check.sh: no bin.tar.gz next to me or in ../gpu-bundle: run scripts/gpu-build.sh first" >&2; exit 2
fi
OUT="$(mkdir -p "${1:-$PWD/gpu-results}" && cd "${1:-$PWD/gpu-results}" && pwd)"
# Unpack the binaries outside the bundle (which may be read-only).
RUN="$(mktemp -d "${TMPDIR:-/tmp}/spt-gpu.XXXXXX")"
tar -C "$RUN" -xzf "$B/bin.tar.gz"
cp "$B/sdpa_bench.py" "$RUN/"
[[ -f "$B/MANIFEST" ]] && cp "$B/MANIFEST" "$RUN/"
cd "$RUN"
t_start=$(date +%s)

# Libraries: the bundle's lib/ if gpu-build.sh --with-libs made one, else a CUDA 13 toolkit or
# the nvidia wheels next to PyTorch.
dirs=("$B/lib")
for d in "${CUDA_HOME:-}/lib64" "${CUDA_HOME:-}/lib" /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 \
         /usr/local/cuda/targets/x86_64-linux/lib; do
  [[ -d "$d" ]] && dirs+=("$d")
done
py_site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)
for s in $py_site; do
  for d in "$s"/nvidia/cu13/lib "$s"/nvidia/*/lib; do [[ -d "$d" ]] && dirs+=("$d"); done
done
export LD_LIBRARY_PATH="$(IFS=:; echo "${dirs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing=$(ldd bin/cuda_parity | grep 'not found' || true)
if [[ -n "$missing" ]]; then
  echo "gpu-check.sh: libraries not found (rebuild the bundle with scripts/gpu-build.sh --with-libs):" >&2
  echo "$missing" >&2
  echo "{\"error\": \"missing libraries\", \"ldd\": $(printf '%s' "$missing" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}" >"$OUT/summary.json"
  exit 2
fi
nvidia-smi >>"$OUT/run.log" 2>&1 || echo "gpu-check.sh: nvidia-smi failed (no GPU?)" >&2

echo "== 1/5 parity tests (CUDA vs CPU)"
# One process per test: a kernel that faults (an illegal address) poisons its CUDA context, and
# every later test in the same process would fail with it, hiding which kernels work. A failed
# test runs again with CUDA_LAUNCH_BLOCKING=1 (while the 100 s last), so that an asynchronous
# fault names its launch. Tests not started within 100 s are reported as skipped (and fail).
# timeout -k: a process that ignores SIGTERM (stuck in the driver) is killed 5 s later.
: >"$OUT/parity.log"
parity_rc=0
p_start=$(date +%s)
mapfile -t tests < <(bin/cuda_parity --list --include-ignored 2>/dev/null | sed -n 's/: test$//p')
[[ ${#tests[@]} == 0 ]] && { echo "gpu-check.sh: bin/cuda_parity lists no tests" | tee -a "$OUT/parity.log"; parity_rc=2; }
for t in "${tests[@]}"; do
  if (( $(date +%s) - p_start > 100 )); then
    echo "test $t ... (skipped: the parity step's 100 s were spent) FAILED" | tee -a "$OUT/parity.log"
    parity_rc=1
    continue
  fi
  timeout -k 5 40 bin/cuda_parity --include-ignored --exact "$t" >"$RUN/one.log" 2>&1
  rc=$?
  cat "$RUN/one.log" >>"$OUT/parity.log"
  if [[ $rc != 0 ]]; then
    parity_rc=$rc
    # A crash leaves "test NAME ... " unfinished: end that line, and count the test as failed.
    grep -q "^test $t \.\.\. FAILED" "$RUN/one.log" ||
      printf '\ntest %s ... (exit %s: timed out or crashed) FAILED\n' "$t" "$rc" >>"$OUT/parity.log"
    if (( $(date +%s) - p_start <= 100 )); then
      echo "-- $t again, with CUDA_LAUNCH_BLOCKING=1 (indented, not counted)" >>"$OUT/parity.log"
      CUDA_LAUNCH_BLOCKING=1 timeout -k 5 40 bin/cuda_parity --include-ignored --exact "$t" 2>&1 |
        sed 's/^/    /' >>"$OUT/parity.log"
      echo >>"$OUT/parity.log"
    fi
  fi
  grep "^test $t " "$OUT/parity.log" | tail -n 1
done

echo "== 2/5 gpu_bench"
timeout -k 5 120 bin/gpu_bench "$OUT" 2>&1 | tee -a "$OUT/run.log"
bench_rc=${PIPESTATUS[0]}

echo "== 3/5 PyTorch SDPA at the same shapes"
timeout -k 5 60 python3 sdpa_bench.py "$OUT" 2>&1 | tee -a "$OUT/run.log"
sdpa_rc=${PIPESTATUS[0]}

train_rc=-1
if [[ -f "$B/train.tar.gz" ]]; then
  echo "== 4/5 spt-train bench --device cuda"
  tar -C "$RUN" -xzf "$B/train.tar.gz"
  train_rc=0
  append=()
  for spec in all-MiniLM-L6-v2:8 gpt2-small:4; do
    timeout -k 5 80 bin/spt-train bench --model "configs/${spec%%:*}" --batch-size "${spec#*:}" --seq-len 512 \
      --steps 5 --warmup 2 --device cuda --output "$OUT/finetune-speed-gpu.json" "${append[@]}" 2>&1 |
      tee -a "$OUT/run.log"
    rc=${PIPESTATUS[0]}
    [[ $rc != 0 ]] && train_rc=$rc
    append=(--append)
  done
  echo "== 5/5 fine-tuning the tiny models on the CPU and on CUDA"
  timeout -k 5 100 python3 gpu-train-parity.py bin/spt-train fixtures "$OUT" 2>&1 | tee -a "$OUT/run.log"
  rc=${PIPESTATUS[0]}
  [[ $rc != 0 ]] && train_rc=$rc
fi

passed=$(grep -cE '^test .* ok$' "$OUT/parity.log" || true)
failed=$(grep -cE '^test .* FAILED$' "$OUT/parity.log" || true)
cat >"$OUT/summary.json" <<JSON
{"parity_rc": $parity_rc, "parity_passed": $passed, "parity_failed": $failed,
 "bench_rc": $bench_rc, "sdpa_rc": $sdpa_rc, "train_rc": $train_rc, "seconds": $(( $(date +%s) - t_start )),
 "bundle": "$(head -n 1 MANIFEST 2>/dev/null | sed 's/"/\\"/g')"}
JSON
cat "$OUT/summary.json"

# The H200 targets (issue 19), bf16, B1 H16 d64 causal, against SDPA's flash attention at the
# same shape: block-sparse fwd+bwd including selection (k = L/8) ≤ 1.5x SDPA at L = 4096 and
# faster than SDPA at L = 16384; our dense flash fwd+bwd ≤ 1.5x SDPA at both. The per-query
# sparse kernel's ratio is kept beside them. Printed and written as target.json.
python3 - "$OUT" <<'PY' || echo "gpu-check.sh: could not compare with SDPA (see run.log)" >&2
import json, os, sys
out = sys.argv[1]
ours = json.load(open(os.path.join(out, "gpu_bench.json")))["cases"]
sdpa = json.load(open(os.path.join(out, "sdpa.json")))["cases"]
res = []
for L in (4096, 16384):
    mine = [c for c in ours if c["L"] == L and c["dtype"] == "bf16" and "sparse" in c]
    theirs = [c for c in sdpa if c["L"] == L and c["dtype"] == "bfloat16" and "fwd_bwd_ms" in c]
    if not (mine and theirs):
        continue
    m, ref = mine[0], theirs[0]["fwd_bwd_ms"]
    row = {"L": L, "k": m["k"], "sdpa_fwd_bwd_ms": ref,
           "per_query_sparse_over_sdpa": m["sparse"]["fwd_bwd_plus_select_ms"] / ref}
    t = m.get("tiled") or {}
    if "block_sparse" in t:
        r = t["block_sparse"]["fwd_bwd_plus_select_ms"] / ref
        row.update(block_sparse_fwd_bwd_plus_select_ms=t["block_sparse"]["fwd_bwd_plus_select_ms"],
                   block_sparse_over_sdpa=r, block_sparse_target=(1.0 if L >= 16384 else 1.5),
                   block_sparse_target_met=r < (1.0 if L >= 16384 else 1.5))
    if "flash" in t:
        r = t["flash"]["fwd_bwd_ms"] / ref
        row.update(flash_fwd_bwd_ms=t["flash"]["fwd_bwd_ms"], flash_over_sdpa=r, flash_target_met=r <= 1.5)
    res.append(row)
json.dump(res, open(os.path.join(out, "target.json"), "w"), indent=1)
print(json.dumps(res, indent=1))
PY
rm -f "$OUT"/*.tmp
[[ $parity_rc == 0 && $bench_rc == 0 && $train_rc -le 0 ]]
