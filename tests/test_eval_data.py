"""Evaluation data side: task registry, loading from every supported source, sampling, prompt masks.

References: the fixture files read with the standard library, NumPy's global legacy RNG (the TinT authors' sampler),
and prompt strings decoded back from the real GPT-2 tokenizer."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tint_hf.evaluation import (
    DataError,
    Example,
    PromptBuilder,
    Template,
    disjoint_subsets,
    get_task,
    load_examples,
    register_template,
    sample_demonstrations,
    write_jsonl,
)

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def fixture_rows() -> tuple[list[dict], list[dict]]:
    train = [json.loads(line) for line in (FIXTURES / "MR" / "train.jsonl").read_text().splitlines()]
    with (FIXTURES / "MR" / "test.csv").open() as f:
        test = list(csv.DictReader(f))
    return train, test


def test_local_jsonl_and_csv_with_string_labels():
    task = get_task("mr")
    train_rows, test_rows = fixture_rows()
    train = load_examples(task, "train", data_dir=FIXTURES)
    test = load_examples(task, "eval", data_dir=FIXTURES)
    assert [(e.text, e.label) for e in train] == [(r["text"], r["label"]) for r in train_rows]
    assert [(e.text, e.label) for e in test] == [(r["text"], {"negative": 0, "positive": 1}[r["label"]])
                                                for r in test_rows]


def test_parquet_tsv_and_save_to_disk_give_the_same_examples(tmp_path):
    import datasets

    task = get_task("MR")
    expected = load_examples(task, "train", data_dir=FIXTURES)
    table = datasets.Dataset.from_list([{"sentence": e.text, "label": e.label} for e in expected])
    table.to_parquet(str(tmp_path / "train.parquet"))
    (tmp_path / "train.tsv").write_text("text\tlabel\n" + "".join(f"{e.text}\t{e.label}\n" for e in expected))
    datasets.DatasetDict(train=table, test=table).save_to_disk(str(tmp_path / "saved" / "MR"))
    assert load_examples(task, "train", file=tmp_path / "train.parquet") == expected
    assert load_examples(task, "train", file=tmp_path / "train.tsv") == expected
    assert load_examples(task, "eval", data_dir=tmp_path / "saved") == expected
    assert write_jsonl(expected, tmp_path / "out" / "train.jsonl") == len(expected)
    assert load_examples(task, "train", file=tmp_path / "out" / "train.jsonl") == expected


def test_text_is_whitespace_normalised(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "  good\n\nfilm\t!", "label": "Positive"}) + "\n")
    assert load_examples(get_task("SST2"), "train", file=tmp_path / "x.jsonl") == [Example("good film !", 1)]


def test_clear_errors(tmp_path):
    task = get_task("MR")
    with pytest.raises(DataError, match="does not exist"):
        load_examples(task, "train", file=tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="prepare-data"):
        load_examples(task, "train", data_dir=tmp_path)
    with pytest.raises(DataError, match="No data source"):
        load_examples(task, "train")
    (tmp_path / "cols.jsonl").write_text(json.dumps({"review": "x", "label": 0}) + "\n")
    with pytest.raises(DataError, match="--text-field"):
        load_examples(task, "train", file=tmp_path / "cols.jsonl")
    (tmp_path / "nolabel.jsonl").write_text(json.dumps({"text": "x", "stars": 0}) + "\n")
    with pytest.raises(DataError, match="--label-field"):
        load_examples(task, "train", file=tmp_path / "nolabel.jsonl")
    (tmp_path / "labels.jsonl").write_text(json.dumps({"text": "x", "label": 2}) + "\n"
                                           + json.dumps({"text": "y", "label": "neutral"}) + "\n")
    with pytest.raises(DataError, match=r"\['2', 'neutral'\].*0\.\.1"):
        load_examples(task, "train", file=tmp_path / "labels.jsonl")
    with pytest.raises(KeyError, match="Known tasks: .*AGNews"):
        get_task("imdb")
    with pytest.raises(KeyError, match="no template 7"):
        task.template(7)


def test_registry_holds_the_paper_templates():
    assert get_task("sst2").template(0).query("great") == "Review: great\nSentiment:"
    assert get_task("agnews").template(0).verbalizer == ("World", "Sports", "Business", "Technology")
    assert get_task("subj").template(0).label_text(1) == " subjective"
    for name in ("SST2", "MR", "CR", "MPQA", "Subj", "AGNews", "AmazonPolarity", "YelpPolarity"):
        task = get_task(name)
        assert all(len(t.verbalizer) == task.num_classes for t in task.templates.values())
        assert task.hub.text_field in task.text_fields and task.paper_note
    assert get_task("ag_news") is get_task("AGNews") and get_task("amazon") is get_task("AmazonPolarity")
    register_template("MR", 9, Template("Movie: {text}\nVerdict:", ("bad", "good"), "\nVerdict:"))
    assert get_task("MR").template(9).label_text(0) == " bad"
    with pytest.raises(ValueError, match="needs 2 label words"):
        register_template("MR", 10, Template("{text}", ("a", "b", "c"), ""))
    del get_task("MR").templates[9]


LABELS = [0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 1, 0, 1] * 3


def test_sampling_is_deterministic_balanced_and_disjoint():
    a = disjoint_subsets(LABELS, [10, 6], seed=0, num_classes=2)
    assert a == disjoint_subsets(LABELS, [10, 6], seed=0, num_classes=2)
    assert a != disjoint_subsets(LABELS, [10, 6], seed=1, num_classes=2)
    assert not set(a[0]) & set(a[1])
    assert Counter(LABELS[i] for i in a[0]) == {0: 5, 1: 5} and Counter(LABELS[i] for i in a[1]) == {0: 3, 1: 3}
    demos = sample_demonstrations(LABELS, 4, seed=3, num_classes=2)
    assert demos == sample_demonstrations(LABELS, 4, seed=3, num_classes=2)
    assert sorted(LABELS[i] for i in demos) == [0, 0, 1, 1]
    assert sample_demonstrations(LABELS, 0, seed=3, num_classes=2) == []
    unbalanced = sample_demonstrations(LABELS, 5, seed=3, num_classes=2, balanced=False)
    assert unbalanced == np.random.default_rng(3).permutation(len(LABELS))[:5].tolist()
    with pytest.raises(ValueError, match="multiple of the 2 classes"):
        sample_demonstrations(LABELS, 3, seed=0, num_classes=2)
    with pytest.raises(ValueError, match="class counts in the pool: \\[21, 39\\]"):
        disjoint_subsets(LABELS, [50], seed=0, num_classes=2)


def test_legacy_sampler_matches_the_authors_global_numpy_draw():
    np.random.seed(2)
    perm = np.random.permutation(len(LABELS))  # the authors' sample_subset
    quota, expected = {0: 3, 1: 3}, []
    for i in perm:
        if quota[LABELS[i]]:
            quota[LABELS[i]] -= 1
            expected.append(int(i))
    assert sample_demonstrations(LABELS, 6, seed=2, num_classes=2, legacy=True) == expected


DEMOS = [Example("a fine film .", 1), Example("so dull", 0)]


def test_prompt_masks_mark_demonstrations_and_label_words(gpt2_tokenizer):
    builder = PromptBuilder(gpt2_tokenizer, get_task("MR").template(0))
    ctx = builder.example_context(DEMOS, "great fun")
    text = "Review: a fine film .\nSentiment: Positive\n\nReview: so dull\nSentiment: Negative\n\n"
    assert gpt2_tokenizer.decode(ctx.input_ids) == text + "Review: great fun\nSentiment:"
    train = [t for t, m in zip(ctx.input_ids, ctx.train_mask) if m]
    assert gpt2_tokenizer.decode(train) == text
    assert ctx.train_mask == tuple(sorted(ctx.train_mask, reverse=True))  # one leading block
    labels = [gpt2_tokenizer.decode([t]) for t, m in zip(ctx.input_ids, ctx.label_mask) if m]
    assert labels == [" Positive", " Negative"]
    assert builder.candidates == [tuple(gpt2_tokenizer.encode(" Negative")), tuple(gpt2_tokenizer.encode(" Positive"))]
    transductive = PromptBuilder(gpt2_tokenizer, get_task("MR").template(0), train_on_query=True)
    assert all(transductive.example_context(DEMOS, "great fun").train_mask)
    # the icl_sfc premise keeps its newline at k = 0 (the authors' `.strip(' ')`), and loses leading spaces after demos
    assert gpt2_tokenizer.decode(builder.premise_context([]).input_ids) == "\nSentiment:"
    subj = PromptBuilder(gpt2_tokenizer, get_task("Subj").template(0))
    assert gpt2_tokenizer.decode(subj.premise_context(DEMOS[:1]).input_ids) == "a fine film . This is subjective\n\nThis is"
    rows = builder.demonstration_rows(DEMOS)
    assert [gpt2_tokenizer.decode(r.input_ids) for r in rows] == [builder.demonstration(d) for d in DEMOS]
    assert all(all(r.train_mask) for r in rows)
    assert [gpt2_tokenizer.decode([t for t, m in zip(r.input_ids, r.label_mask) if m]) for r in rows] == \
        [" Positive", " Negative"]


def test_bos_follows_the_tokenizer_unless_forced(gpt2_tokenizer):
    template = get_task("MR").template(0)
    assert PromptBuilder(gpt2_tokenizer, template).example_context([], "x").input_ids[0] != gpt2_tokenizer.bos_token_id
    forced = PromptBuilder(gpt2_tokenizer, template, add_bos=True).example_context(DEMOS, "x")
    assert forced.input_ids[0] == gpt2_tokenizer.bos_token_id and forced.train_mask[0] == 1


def _write_hub_copy(root: Path, task_name: str) -> dict[str, list[Example]]:
    """A local folder laid out like the task's Hub dataset repo (parquet shards, config metadata in README.md, the
    repo's own column names), and the examples each of our splits must read from it."""
    from datasets import Dataset

    def shard(path: Path, columns: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(columns).to_parquet(str(path))

    if task_name == "SST2":  # nyu-mll/glue: one folder per config, declared in the README's YAML header
        shard(root / "sst2" / "train-00000-of-00001.parquet",
              {"sentence": ["a gem ", "dull"], "label": [1, 0], "idx": [0, 1]})
        shard(root / "sst2" / "validation-00000-of-00001.parquet",
              {"sentence": ["fine  work"], "label": [1], "idx": [0]})
        shard(root / "sst2" / "test-00000-of-00001.parquet", {"sentence": ["hidden"], "label": [-1], "idx": [0]})
        shard(root / "cola" / "train-00000-of-00001.parquet", {"sentence": ["other config"], "label": [5], "idx": [0]})
        splits = {"cola": ("train",), "sst2": ("train", "validation", "test")}
        configs = "".join(f"- config_name: {name}\n  data_files:\n"
                          + "".join(f"  - split: {s}\n    path: {name}/{s}-*\n" for s in names)
                          for name, names in splits.items())
        (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
        return {"train": [Example("a gem", 1), Example("dull", 0)], "eval": [Example("fine work", 1)]}
    if task_name == "AmazonPolarity":  # fancyzhx/amazon_polarity: default config, title + content columns
        shard(root / "data" / "train-00000-of-00001.parquet",
              {"label": [0, 1], "title": ["t1", "t2"], "content": ["broke fast", "love it"]})
        shard(root / "data" / "test-00000-of-00001.parquet", {"label": [1], "title": ["t3"], "content": ["works"]})
        return {"train": [Example("broke fast", 0), Example("love it", 1)], "eval": [Example("works", 1)]}
    # fancyzhx/ag_news: four classes
    shard(root / "data" / "train-00000-of-00001.parquet", {"text": ["goal!", "stocks up"], "label": [1, 2]})
    shard(root / "data" / "test-00000-of-00001.parquet", {"text": ["new chip"], "label": [3]})
    return {"train": [Example("goal!", 1), Example("stocks up", 2)], "eval": [Example("new chip", 3)]}


@pytest.mark.parametrize("task_name", ["SST2", "AmazonPolarity", "AGNews"])
def test_hub_source_loads_through_datasets_from_a_local_copy(tmp_path, monkeypatch, task_name):
    """The --hub path is datasets.load_dataset(repo, config, split): run it on a local folder laid out like the repo
    (the Hub itself is unreachable here), with the task's config, split names and text column."""
    import dataclasses

    from tint_hf.cli import main

    task = get_task(task_name)
    expected = _write_hub_copy(tmp_path / "repo", task_name)
    monkeypatch.setattr(task, "hub", dataclasses.replace(task.hub, path=str(tmp_path / "repo")))
    for split in ("train", "eval"):
        assert load_examples(task, split, hub=True) == expected[split]
    assert main(["prepare-data", "--tasks", task_name, "--hub", "--out", str(tmp_path / "out")]) == 0
    for split in ("train", "eval"):
        assert load_examples(task, split, data_dir=tmp_path / "out") == expected[split]
    monkeypatch.setattr(task, "hub", dataclasses.replace(task.hub, path=str(tmp_path / "missing")))
    with pytest.raises(DataError, match="prepare-data"):
        load_examples(task, "train", hub=True)
