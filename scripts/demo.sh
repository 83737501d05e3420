#!/usr/bin/env bash
# Set up (the pinned versions, no extras) and run the embedded demo: `bash scripts/demo.sh [tint-hf demo args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
tint-hf demo "$@"
