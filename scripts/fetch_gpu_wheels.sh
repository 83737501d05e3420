#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach PyPI (the lent H100 of the device tool): flash-linear-attention, the
# optional MesaNet kernels that `mesa_backend="fla"` and bench/mesa.py compare against. Pure-Python wheels (Triton
# kernels), 1.5 MB, into .whl/ (git-ignored; send it with the run's `carry: [".whl"]`). bench/gpu.sh installs them.
#
#   bash scripts/fetch_gpu_wheels.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$ROOT/.whl"
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$ROOT/.whl" \
    flash-linear-attention==0.6.0 fla-core==0.6.0
ls -l "$ROOT/.whl"
