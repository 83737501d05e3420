#!/usr/bin/env bash
# Create .venv (if missing) and install tint_hf with its pinned dependencies. Sourced by test.sh and demo.sh.
# torch==2.13.0 is named explicitly: on the project machines it is a local CPU build; any torch in the
# pyproject range (<2.14) works elsewhere.
set -euo pipefail
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
source .venv/bin/activate
python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} HF_EVALUATE_OFFLINE=${HF_EVALUATE_OFFLINE:-1}
