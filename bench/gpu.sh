#!/usr/bin/env bash
# Every GPU measurement of bench/RESULTS.md in one command, for a CUDA machine whose python3 has torch and
# transformers (the device tool's image). Output goes to $OUT (default outputs/gpu/), one log per benchmark.
#
#   bash scripts/fetch_gpu_wheels.sh       # here, once: fla wheels into .whl/ (carried to the GPU machine)
#   bash bench/gpu.sh                      # there, from the repository root: everything
#   bash bench/gpu.sh mesa fla_test        # only these (the device tool allows 10 minutes per command, so
#   bash bench/gpu.sh mesa_tf32 simulate tint   #  split the set over two calls)
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

SELECTED=" $* "
run() {  # run NAME CMD...: log to $OUT/NAME.txt, keep going on failure; skipped unless selected (or none named)
    local name=$1; shift
    [[ "$SELECTED" == "  " || "$SELECTED" == *" $name "* ]] || return 0
    echo "== $name: $*"
    (cd "$ROOT/bench" && "$@") > "$OUT/$name.txt" 2>&1 || echo "   failed (rc=$?), see $OUT/$name.txt"
    tail -n 20 "$OUT/$name.txt"
}
# the op before the 2026-11-23 rework, where git history came along (the device tool sends the work tree only)
BASELINE=()
git -C "$ROOT" rev-parse -q --verify "5448b3d^{commit}" > /dev/null 2>&1 && BASELINE=(--baseline-rev 5448b3d)
run mesa python3 mesa.py --device cuda --compile "${BASELINE[@]}"
run mesa_tf32 python3 mesa.py --device cuda --compile --tf32 --solvers cg
run simulate python3 simulate.py --device cuda --seq-lens 256 1024 2048
run tint python3 tint.py --device cuda --seq-lens 1024
run fla_test python3 -m pytest -q "$ROOT/tests/test_mesa_ops.py" -k "fla or compiles" -p no:cacheprovider
