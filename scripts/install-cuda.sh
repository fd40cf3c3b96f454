#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, NVVM, headers) from PyPI into a local,
# git-ignored venv, `.venv-cuda`, and prints the environment to export.
#
#   scripts/install-cuda.sh            # compiler only (enough for `cargo check --features cuda`)
#   scripts/install-cuda.sh --link     # also the libraries a CUDA binary links against
#                                      # (cuBLAS, cuBLASLt, cuRAND, NVRTC) for scripts/gpu-build.sh
#   eval "$(scripts/install-cuda.sh --env)"   # just print the exports (after an install)
#
# Every wheel is pinned: a newer nvidia-nvvm (13.5) emits PTX ISA 9.5, which ptxas 13.0 rejects
# ("Unsupported .version 9.5"), and the GPU machine's driver (580.x) runs CUDA 13.0. Idempotent:
# a second run finds the stamp and does nothing. Override the venv with SPT_CUDA_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SPT_CUDA_VENV:-$PWD/.venv-cuda}"

COMPILER=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
# CUDA 13.0 Update 2 libraries, the versions the 13.0 toolkit ships.
LINK=(
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
)

want_link=0
env_only=0
for a in "$@"; do
  case "$a" in
    --link) want_link=1 ;;
    --env) env_only=1 ;;
    *) echo "install-cuda.sh: unknown argument $a (expected --link or --env)" >&2; exit 2 ;;
  esac
done

print_env() {
  local c="$1"
  echo "export PATH=\"$c/bin:\$PATH\""
  echo "export CUDA_HOME=\"$c\" CUDA_ROOT=\"$c\" CUDA_PATH=\"$c\""
  echo "export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-90}\""
  echo "export LIBRARY_PATH=\"$c/lib:$c/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}\""
}

site() {
  "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

if [[ $env_only == 1 ]]; then
  print_env "$(site)/nvidia/cu13"
  exit 0
fi

install() {
  local stamp="$VENV/.spt-$1"
  shift
  local want="$*"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "install-cuda.sh: $VENV already has: $want" >&2
    return
  fi
  # --no-deps: the pins are the whole set; never let pip resolve a newer nvvm.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "$@" >&2
  echo "$want" >"$stamp"
}

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV" >&2
fi
install compiler "${COMPILER[@]}"
[[ $want_link == 1 ]] && install link "${LINK[@]}"

C="$(site)/nvidia/cu13"
if [[ ! -x "$C/bin/nvcc" ]]; then
  echo "install-cuda.sh: no nvcc at $C/bin/nvcc after the install" >&2
  exit 1
fi
"$C/bin/nvcc" --version | tail -n 2 >&2
print_env "$C"
