#!/usr/bin/env bash
# CI step for the CUDA path on a machine without a GPU: installs the pinned CUDA 13.0 compiler
# (scripts/install-cuda.sh) and type-checks every target with the `cuda` feature, which also runs
# spt-ops' build.rs (nvcc compiles kernels/*.cu to PTX for sm_90, warnings as errors; ptxas
# assembles each PTX once, spills are errors), then clippy -D warnings on the CUDA-only code.
#
# Caching: keep `.venv-cuda/` (~250 MB with the compiler only; 1.2 GB after gpu-build.sh adds
# the link libraries) and the cargo target dir between runs;
# CUDA_COMPUTE_CAP and the toolchain must stay the same or candle-kernels' PTX is rebuilt
# (the bulk of a cold run). Uses CARGO_TARGET_DIR if set.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/install-cuda.sh)"
export CUDA_COMPUTE_CAP=90
# Parallel nvcc jobs in candle-kernels' build (cudaforge); default to the cores we have.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
echo "== cargo check --workspace --all-targets --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
cargo check --workspace --all-targets --features cuda
# Lints of the CUDA-only code (which the CPU clippy never sees). Reuses the dependency artifacts
# of the check above (clippy wraps workspace crates only): about 10 s more.
echo "== cargo clippy --workspace --all-targets --features cuda -- -D warnings"
cargo clippy --workspace --all-targets --features cuda -- -D warnings
