#!/usr/bin/env bash
# Set up and run ruff and the test suite (what CI runs):
#
#   bash scripts/test.sh [--latest | --lowest] [pytest args]     e.g. bash scripts/test.sh -m "not slow" -k mesa
#
# Default: the pinned versions of constraints/tested.txt in .venv; --latest / --lowest: a fresh venv with the newest /
# lowest versions pyproject.toml allows (see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=()
case "${1:-}" in --latest|--lowest) MODE=("$1"); shift ;; esac
source scripts/setup.sh "${MODE[@]}" dev
python -m ruff check tint_hf tests bench examples scripts
python -m pytest -q "$@"
