#!/usr/bin/env bash
# Every GPU measurement of bench/RESULTS.md in one command, for a CUDA machine whose python3 has torch and
# transformers (the device tool's image). Output goes to $OUT (default outputs/gpu/), one log per benchmark.
#
#   bash scripts/fetch_gpu_wheels.sh       # here, once: fla wheels into .whl/ (carried to the GPU machine)
#   bash bench/gpu.sh                      # there, from the repository root
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/outputs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
    python3 -m pip install --quiet --no-deps "$ROOT"/.whl/*.whl
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

run() {  # run NAME CMD...: log to $OUT/NAME.txt, keep going on failure
    local name=$1; shift
    echo "== $name: $*"
    (cd "$ROOT/bench" && "$@") > "$OUT/$name.txt" 2>&1 || echo "   failed (rc=$?), see $OUT/$name.txt"
    tail -n 20 "$OUT/$name.txt"
}
run mesa python3 mesa.py --device cuda --compile --baseline-rev 5448b3d
run mesa_tf32 python3 mesa.py --device cuda --compile --tf32 --solvers cg
run simulate python3 simulate.py --device cuda --seq-lens 256 1024 2048
run tint python3 tint.py --device cuda --seq-lens 1024
run fla_test python3 -m pytest -q "$ROOT/tests/test_mesa_ops.py" -k "fla or compiles" -p no:cacheprovider
