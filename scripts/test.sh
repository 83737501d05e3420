#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: `bash scripts/test.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
python -m ruff check tint_hf tests bench examples scripts
python -m pytest -q "$@"
