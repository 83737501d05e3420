#!/usr/bin/env bash
# Create a virtual environment and install tint_hf into it. Sourced by test.sh and demo.sh:
#
#   source scripts/setup.sh [--latest | --lowest] [EXTRAS]       (EXTRAS: e.g. "dev"; default: none)
#
#   (default)  .venv        exactly the versions the suite last passed on (constraints/tested.txt)
#   --latest   .venv-latest the newest versions pyproject.toml allows (a fresh venv every time)
#   --lowest   .venv-lowest the lowest versions pyproject.toml allows (constraints/lowest.txt; fresh every time)
#
# The default venv is rebuilt from scratch whenever constraints/tested.txt, pyproject.toml or the Python version
# change, so a venv made for other pins never stays in use. torch 2.13.0 is a local CPU build on the project
# machines (pip takes it from disk); elsewhere pip fetches the same version.
set -euo pipefail
MODE=tested
case "${1:-}" in
    --latest) MODE=latest; shift ;;
    --lowest) MODE=lowest; shift ;;
esac
EXTRAS=${1:-}
PY=${PYTHON:-python3}
TARGET=".[${EXTRAS}]"
[ -n "$EXTRAS" ] || TARGET="."
PIP_QUIET=(-q --disable-pip-version-check)

case "$MODE" in
    tested)
        VENV=.venv
        STAMP="$(cat constraints/tested.txt pyproject.toml | sha256sum | cut -c1-16) $("$PY" -c 'import sys; print(sys.version.split()[0])')"
        if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.tint_hf-stamp" 2>/dev/null)" != "$STAMP" ]; then
            echo "setup: $VENV was built for other pins; rebuilding it from scratch." >&2
            rm -rf "$VENV"
        fi
        [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
        echo "$STAMP" > "$VENV/.tint_hf-stamp"
        INSTALL=(-c constraints/tested.txt -e "$TARGET") ;;
    lowest)
        VENV=.venv-lowest; rm -rf "$VENV"; "$PY" -m venv "$VENV"
        INSTALL=(-c constraints/lowest.txt -e "$TARGET") ;;
    latest)
        VENV=.venv-latest; rm -rf "$VENV"; "$PY" -m venv "$VENV"
        INSTALL=(--upgrade --upgrade-strategy eager -e "$TARGET") ;;
esac
source "$VENV/bin/activate"
python -m pip install "${PIP_QUIET[@]}" "${INSTALL[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
python -m pip check >/dev/null || { python -m pip check >&2; exit 1; }
if [ "$MODE" != tested ]; then
    echo "setup: $VENV has" $(python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|accelerate|datasets|peft|huggingface-hub)==' | tr '\n' ' ') >&2
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
