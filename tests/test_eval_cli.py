"""``tint-hf eval`` / ``ppl`` / ``prepare-data`` end to end on a saved tiny GPT-2 and the fixture data.

The result files are checked against what they must be consistent with: accuracy recomputed from the per-example
predictions, the learning rate that maximises the recorded dev accuracy, the test subset drawn independently with
disjoint_subsets, and (ppl) the lr=0 dynamic run equal to the model as is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2

from tint_hf.cli import console_main, main
from tint_hf.evaluation import disjoint_subsets, get_task, load_examples

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gpt2_tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_gpt2(vocab_size=50257, n_positions=256, dtype=torch.float32).save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


def test_eval_writes_consistent_results(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["eval", "--model", str(checkpoint), "--tasks", "MR", "--data-dir", str(FIXTURES),
                 "--modes", "icl,dynamic,tint", "--shots", "0,2", "--seeds", "1,2", "--lrs", "0,0.05",
                 "--n-eval", "8", "--n-dev", "4", "--calibration", "icl_sfc", "--batch-size", "3", "--quiet",
                 "--num-prefixes", "8", "--out", str(out)]) == 0
    assert "| MR | dynamic | 2 |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["arguments"]["calibration"] == "icl_sfc" and results["arguments"]["lrs"] == [0.0, 0.05]
    runs = results["runs"]
    assert [(r["mode"], r["shots"], r["seed"]) for r in runs] == [
        (m, k, s) for m in ("icl", "dynamic", "tint") for k, seeds in ((0, [1]), (2, [1, 2])) for s in seeds]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 * len(runs)
    pool = load_examples(get_task("MR"), "eval", data_dir=FIXTURES)
    test_idx, dev_idx = disjoint_subsets([e.label for e in pool], [8, 4], seed=0, num_classes=2)
    for run in runs:
        rows = [p for p in predictions if (p["mode"], p["shots"], p["seed"]) == (run["mode"], run["shots"], run["seed"])]
        assert [p["index"] for p in rows] == test_idx
        assert all(p["label"] == pool[p["index"]].label for p in rows)
        assert run["accuracy"] == pytest.approx(sum(p["prediction"] == p["label"] for p in rows) / 8)
        if run["mode"] != "icl":
            dev = {float(lr): acc for lr, acc in run["dev_accuracy"].items()}
            assert run["lr"] == max(dev, key=dev.get) and set(dev) == {0.0, 0.05}
    summary = (out / "summary.md").read_text()
    assert summary.count("| MR |") == 6
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_variant_in_tint_and_dynamic_modes(checkpoint, tmp_path):
    """`--variant single` reaches both adaptive modes; with TinT's approximations in dynamic mode the two agree on
    every prediction (the scores themselves are compared in test_eval_scoring)."""
    out = tmp_path / "single"
    assert main(["eval", "--model", str(checkpoint), "--tasks", "MR", "--data-dir", str(FIXTURES),
                 "--modes", "dynamic,tint", "--variant", "single", "--tint-approximations", "--shots", "2",
                 "--seeds", "1", "--lrs", "0.05", "--n-eval", "8", "--n-dev", "4", "--batch-size", "3", "--quiet",
                 "--num-prefixes", "8", "--out", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["mode"] for r in runs] == ["dynamic/single/tint-approx", "tint/single"]
    assert all(r["mode_config"]["variant"] == "single" for r in runs)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    by_mode = [[p["prediction"] for p in predictions if p["mode"] == r["mode"]] for r in runs]
    assert by_mode[0] == by_mode[1] and len(by_mode[1]) == 8


def test_eval_errors_name_the_fix(checkpoint, tmp_path, capsys):
    common = ["eval", "--model", str(checkpoint), "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="choose from"):
        main(common + ["--tasks", "MR", "--modes", "magic"])
    with pytest.raises(KeyError, match="Unknown task 'IMDB'"):
        main(common + ["--tasks", "IMDB", "--data-dir", str(FIXTURES)])
    with pytest.raises(ValueError, match="prepare-data"):
        main(common + ["--tasks", "CR", "--data-dir", str(FIXTURES)])
    # the executable reports the same errors as one line, no traceback
    assert console_main(common + ["--tasks", "IMDB", "--data-dir", str(FIXTURES)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("tint-hf: error: Unknown task 'IMDB'")


def test_ppl_dynamic_with_zero_lr_equals_the_model_as_is(checkpoint, tmp_path):
    out = tmp_path / "ppl.json"
    assert main(["ppl", "--model", str(checkpoint), "--modes", "icl,dynamic", "--lrs", "0,0.01", "--block-size", "32",
                 "--max-blocks", "3", "--quiet", "--out", str(out)]) == 0
    results = {(r["mode"], r["lr"]): r for r in json.loads(out.read_text())["results"]}
    assert results["dynamic", 0.0]["perplexity"] == pytest.approx(results["icl", None]["perplexity"], rel=1e-6)
    assert results["dynamic", 0.01]["perplexity"] != pytest.approx(results["icl", None]["perplexity"], rel=1e-6)
    assert results["icl", None]["tokens"] == 3 * 16


def test_prepare_data_converts_to_the_canonical_layout(tmp_path):
    assert main(["prepare-data", "--tasks", "MR", "--data-dir", str(FIXTURES), "--out", str(tmp_path)]) == 0
    task = get_task("MR")
    for split in ("train", "eval"):
        assert load_examples(task, split, data_dir=tmp_path) == load_examples(task, split, data_dir=FIXTURES)
    assert sorted(p.name for p in (tmp_path / "MR").iterdir()) == ["test.jsonl", "train.jsonl"]
