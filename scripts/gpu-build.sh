#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything the GPU machine needs (it has no cargo), into
# one git-ignored folder, gpu-bundle/:
#   bin.tar.gz        bin/cuda_parity: the CUDA-vs-CPU parity tests (tests/cuda_parity.rs), and
#                     bin/gpu_bench: sparse vs dense attention (examples/gpu_bench.rs); ~25 MB
#   gpu-check.sh      runs both there, plus sdpa_bench.py (PyTorch SDPA at the same shapes)
#   train.tar.gz      only with --with-train: bin/spt-train (--features cuda), the model configs
#                     of bench/configs, the tiny fixture models and gpu-train-parity.py, for
#                     `spt-train bench --device cuda` and CPU-vs-CUDA fine-tuning (~19 MB more)
#   lib/              only with --with-libs: cuBLAS, cuBLASLt, cuRAND, NVRTC, cudart from the
#                     pinned CUDA 13.0 wheels (~800 MB); without it, gpu-check.sh looks for
#                     them on the GPU machine (CUDA toolkit, or PyTorch's nvidia wheels).
#   MANIFEST          git revision, toolchain, sha256 of every file.
#
# Linking: the libraries come from pinned PyPI wheels (scripts/install-cuda.sh --link). There is
# no wheel for libcuda (it ships with the driver), so a link stub is built: a shared object with
# soname libcuda.so.1 that defines every cu* symbol cudarc's bindings reference. It is used only
# at link time; at run time the driver's real libcuda.so.1 is loaded. Nothing here is copied
# into the bundle from the stub.
#
# Usage: scripts/gpu-build.sh [--with-train] [--with-libs]   (uses CARGO_TARGET_DIR if set)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
with_libs=0 with_train=0
for arg in "$@"; do
  case "$arg" in
    --with-libs) with_libs=1 ;;
    --with-train) with_train=1 ;;
    *) echo "gpu-build.sh: unknown option $arg (expected --with-train, --with-libs)" >&2; exit 2 ;;
  esac
done

eval "$(scripts/install-cuda.sh --link)"
export CUDA_COMPUTE_CAP=90
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
C="$CUDA_HOME"

# Link directory: unversioned names for the wheel libraries, and the libcuda stub.
LINK="$ROOT/.venv-cuda/link"
mkdir -p "$LINK"
for pair in cublas:libcublas.so.13 cublasLt:libcublasLt.so.13 curand:libcurand.so.10 \
            nvrtc:libnvrtc.so.13 cudart:libcudart.so.13; do
  name="${pair%%:*}" real="${pair#*:}"
  [[ -f "$C/lib/$real" ]] || { echo "gpu-build.sh: missing $C/lib/$real" >&2; exit 1; }
  ln -sf "$C/lib/$real" "$LINK/lib$name.so"
done
if [[ ! -f "$LINK/libcuda.so" ]]; then
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src 2>/dev/null | head -n 1)
  [[ -n "$sys" ]] || { echo "gpu-build.sh: cudarc 0.19.10 sources not found (run cargo fetch)" >&2; exit 1; }
  grep -rhoE 'fn cu[A-Z][A-Za-z0-9_]*\(' "$sys/driver/sys" | sed -E 's/^fn (.*)\($/\1/' | sort -u |
    awk '{ printf "void %s(void) {}\n", $1 }' >"$LINK/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"
  echo "gpu-build.sh: libcuda link stub with $(wc -l <"$LINK/cuda_stub.c") symbols" >&2
fi
export LIBRARY_PATH="$LINK${LIBRARY_PATH:+:$LIBRARY_PATH}"

TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
echo "== building the parity tests and the benchmark (--features cuda, profile test)"
test_bin=$(cargo test --no-run --features cuda -p spt-ops --test cuda_parity --message-format=json |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_parity":
        print(m["executable"])' | tail -n 1)
cargo build --profile test --features cuda -p spt-ops --example gpu_bench
bench_bin="$TARGET/debug/examples/gpu_bench"
[[ -x "$test_bin" && -x "$bench_bin" ]] || { echo "gpu-build.sh: binaries not found ($test_bin, $bench_bin)" >&2; exit 1; }
if [[ $with_train == 1 ]]; then
  echo "== building spt-train (--features cuda, profile test: reuses the artifacts above)"
  cargo build --profile test --features cuda -p spt-train --bin spt-train
fi

B="$ROOT/gpu-bundle"
rm -rf "$B"
mkdir -p "$B"
# Debug info off, symbols kept (backtraces); compressed, because most of each binary is candle's
# PTX text: ~110 MB → ~25 MB, so the bundle fits a 64 MiB transfer. gpu-check.sh unpacks it.
stage="$(mktemp -d)"
mkdir -p "$stage/bin"
strip --strip-debug -o "$stage/bin/cuda_parity" "$test_bin"
strip --strip-debug -o "$stage/bin/gpu_bench" "$bench_bin"
tar -C "$stage" -czf "$B/bin.tar.gz" bin
rm -rf "$stage"
if [[ $with_train == 1 ]]; then
  stage="$(mktemp -d)"
  mkdir -p "$stage/bin"
  strip --strip-debug -o "$stage/bin/spt-train" "$TARGET/debug/spt-train"
  cp -r bench/configs "$stage/configs"
  mkdir -p "$stage/fixtures"
  for m in tiny-bert-cls tiny-gpt2; do
    mkdir -p "$stage/fixtures/$m"
    cp "crates/spt-models/tests/fixtures/$m/config.json" "crates/spt-models/tests/fixtures/$m/model.safetensors" "$stage/fixtures/$m/"
  done
  cp scripts/gpu-train-parity.py "$stage/"
  tar -C "$stage" -czf "$B/train.tar.gz" bin configs fixtures gpu-train-parity.py
  rm -rf "$stage"
fi
cp scripts/gpu-check.sh scripts/sdpa_bench.py "$B/"
if [[ $with_libs == 1 ]]; then
  mkdir -p "$B/lib"
  for f in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libnvrtc-builtins.so.13.0 libcudart.so.13; do
    cp "$C/lib/$f" "$B/lib/"
  done
fi
{
  echo "spt gpu-bundle built $(date -u +%FT%TZ) from $(git rev-parse HEAD)$(git diff --quiet || echo ' (dirty)')"
  echo "nvcc: $(nvcc --version | tail -n 1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; rustc: $(rustc --version)"
  echo "needs at run time: $(readelf -d "$test_bin" | sed -nE 's/.*NEEDED.*\[(.*)\]/\1/p' | tr '\n' ' ')"
  (cd "$B" && find . -type f ! -name MANIFEST -print0 | sort -z | xargs -0 sha256sum)
} >"$B/MANIFEST"
du -sh "$B"/* >&2
echo "gpu-build.sh: bundle ready in $B; on the GPU machine run: ./gpu-check.sh [OUT_DIR]" >&2
