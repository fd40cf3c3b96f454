#!/usr/bin/env bash
# Runs on the GPU machine (H200, driver 580 / CUDA 13.0; no cargo there), from the bundle that
# scripts/gpu-build.sh made (gpu-bundle/), or from the repo root after a gpu-build:
#   1. every CUDA-vs-CPU parity test, ignored ones included (forward and backward, 1e-4);
#   2. the benchmark: sparse attention fwd+bwd vs dense at L = 1024, 4096, 16384 (H=16, d=64);
#   3. PyTorch SDPA (flash / efficient) at the same shapes, for comparison.
# Writes OUT_DIR (default ./gpu-results): parity.log, gpu_bench.json, bench.log, sdpa.json,
# sdpa.log, nvidia-smi.txt, summary.json. Budget: under 8 minutes (timeouts 180 + 180 + 90 s).
# Exit status: non-zero if a parity test failed or a step could not run.
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
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "gpu-check.sh: nvidia-smi failed (no GPU?)" >&2

echo "== 1/3 parity tests (CUDA vs CPU)"
timeout 180 bin/cuda_parity --include-ignored --test-threads=1 2>&1 | tee "$OUT/parity.log"
parity_rc=${PIPESTATUS[0]}

echo "== 2/3 gpu_bench"
timeout 180 bin/gpu_bench "$OUT" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== 3/3 PyTorch SDPA at the same shapes"
timeout 90 python3 sdpa_bench.py "$OUT" 2>&1 | tee "$OUT/sdpa.log"
sdpa_rc=${PIPESTATUS[0]}

passed=$(grep -cE '^test .* ok$' "$OUT/parity.log" || true)
failed=$(grep -cE '^test .* FAILED$' "$OUT/parity.log" || true)
cat >"$OUT/summary.json" <<JSON
{"parity_rc": $parity_rc, "parity_passed": $passed, "parity_failed": $failed,
 "bench_rc": $bench_rc, "sdpa_rc": $sdpa_rc, "seconds": $(( $(date +%s) - t_start )),
 "bundle": "$(head -n 1 MANIFEST 2>/dev/null | sed 's/"/\\"/g')"}
JSON
cat "$OUT/summary.json"
[[ $parity_rc == 0 && $bench_rc == 0 ]]
