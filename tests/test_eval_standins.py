"""The offline stand-in builders (tint_hf.evaluation.standins) on tiny files written here in each corpus's format;
expected examples are written out by hand."""

import bz2
import csv
import json

import pytest

from tint_hf.evaluation import Example, get_task, load_examples
from tint_hf.evaluation.standins import (
    MISSING,
    STAND_INS,
    bbc_news_topics,
    customer_reviews,
    fine_food_reviews,
    main,
    movie_review_polarity,
    rotten_tomatoes_polarity,
    rotten_tomatoes_subjectivity,
    split_pool,
)

PAPER_TASKS = ("SST2", "MR", "CR", "MPQA", "Subj", "AGNews", "AmazonPolarity", "YelpPolarity")


@pytest.fixture
def rotten_tomatoes(tmp_path):
    path = tmp_path / "rt.csv.bz2"
    rows = [("fresh", "A  joy to watch.", "m1", "False"), ("rotten", "Dull and long.", "m2", "False"),
            ("plot", "A boy meets a girl in Paris. They fall in love! Then war comes.", "m3", "True"),
            ("fresh", "A  joy to watch.", "m4", "False")]
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerows(rows)
    return path


def test_every_paper_task_is_a_stand_in_or_declared_missing():
    assert set(STAND_INS) | set(MISSING) == set(PAPER_TASKS) and not set(STAND_INS) & set(MISSING)
    for name in PAPER_TASKS:
        get_task(name)  # every name is a registered task


def test_split_pool_sends_every_nth_example_to_the_evaluation_pool():
    examples = [Example(str(i), i % 2) for i in range(7)]
    train, evaluation = split_pool(examples, 3)
    assert [e.text for e in evaluation] == ["0", "3", "6"]
    assert [e.text for e in train] == ["1", "2", "4", "5"]


def test_rotten_tomatoes_polarity_and_subjectivity(rotten_tomatoes):
    assert rotten_tomatoes_polarity(rotten_tomatoes) == [Example("A joy to watch.", 1), Example("Dull and long.", 0)]
    # plot sentences of >= 5 words are objective (0); "Then war comes." is too short; duplicates dropped
    assert rotten_tomatoes_subjectivity(rotten_tomatoes) == [
        Example("A joy to watch.", 1), Example("Dull and long.", 1), Example("A boy meets a girl in Paris.", 0)]


def test_bbc_news_topics_map_to_agnews_classes(tmp_path):
    for topic, name, text in [("business", "001.txt", "Shares rise\n\nMarkets gained 2%. Traders cheered."),
                              ("entertainment", "001.txt", "Film wins\n\nA film won."),
                              ("sport", "001.txt", "Team wins!\n\nThe team won 3-0 on Sunday. Fans sang."),
                              ("tech", "002.txt", "New phone\n\nA phone costs \u00a3100. It is thin.")]:
        (tmp_path / topic).mkdir(exist_ok=True)
        (tmp_path / topic / name).write_text(text, encoding="utf-8")
    (tmp_path / "politics").mkdir()
    (tmp_path / "politics" / "001.txt").write_bytes("Vote\n\nA \u00a3 vote. Then more.".encode("latin-1"))
    labels = get_task("AGNews").label_names
    assert bbc_news_topics(tmp_path) == [
        Example("Shares rise. Markets gained 2%.", labels.index("business")),
        Example("Vote. A \u00a3 vote.", labels.index("world")),
        Example("Team wins! The team won 3-0 on Sunday.", labels.index("sports")),
        Example("New phone. A phone costs \u00a3100.", labels.index("technology"))]


def test_mr_cr_and_fine_foods_parsers(tmp_path):
    mr = tmp_path / "mr.csv"
    mr.write_text("\ufeff1,a fine film .\n-1,so dull\n", encoding="utf-8")
    assert movie_review_polarity(mr) == [Example("a fine film .", 1), Example("so dull", 0)]
    cr = tmp_path / "cr.txt"
    cr.write_text("1_1\t2.1\tgreat phone\n1_2\t-0.3\tit is a phone\n1_3\t-1.5\tbattery died\n", encoding="latin-1")
    assert customer_reviews(cr) == [Example("great phone", 1), Example("battery died", 0)]
    foods = tmp_path / "foods.jsonl"
    rows = [{"review": "Tasty.<br /><br />Buy it", "score": "great"}, {"review": "meh " * 41, "score": "other"},
            {"review": "Too salty", "score": "other"}]
    foods.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert fine_food_reviews(foods) == [Example("Tasty. Buy it", 1), Example("Too salty", 0)]


def test_cli_writes_the_canonical_layout_that_eval_reads(tmp_path, rotten_tomatoes, capsys):
    assert main(["--out", str(tmp_path / "data"), "--rotten-tomatoes", str(rotten_tomatoes)]) == 0
    printed = capsys.readouterr().out
    assert "SST2: 1 demonstration-pool and 1 evaluation-pool examples" in printed
    assert "MPQA: no stand-in" in printed and "YelpPolarity: no stand-in" in printed
    task = get_task("Subj")
    assert load_examples(task, "eval", data_dir=tmp_path / "data") == [Example("A joy to watch.", 1)]
    assert len(load_examples(task, "train", data_dir=tmp_path / "data")) == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--bbc", str(tmp_path / "absent")])
