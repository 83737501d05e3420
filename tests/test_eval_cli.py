"""``tint-hf eval`` / ``ppl`` / ``prepare-data`` end to end on a saved tiny GPT-2 and the fixture data.

The result files are checked against what they must be consistent with: accuracy recomputed from the per-example
predictions, the learning rate that maximises the recorded dev accuracy, the test subset drawn independently with
disjoint_subsets, and (ppl) the lr=0 dynamic run equal to the model as is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_tiny_gpt2

from tint_hf.cli import console_main, main
from tint_hf.evaluation import disjoint_subsets, get_task, load_examples
from tint_hf.runstore import RunStoreError

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gpt2_tokenizer):
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny"), gpt2_tokenizer, n_positions=256)


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


def test_tint_memory_budget_reaches_the_tint_mode(checkpoint, tmp_path):
    """--tint-memory-gib bounds the per-row steps of rows that train on their own tokens: a budget below one row is
    refused with the numbers (eval and ppl), a budget of a few rows gives the results of the default."""
    common = ["--model", str(checkpoint), "--modes", "tint", "--lrs", "0.05", "--num-prefixes", "8", "--quiet"]
    eval_args = ["eval", *common, "--tasks", "MR", "--data-dir", str(FIXTURES), "--shots", "0", "--seeds", "1",
                 "--n-eval", "8", "--n-dev", "4", "--batch-size", "4", "--train-on-query", "tint"]
    with pytest.raises(MemoryError, match="One row's own TinT step needs about"):
        main([*eval_args, "--tint-memory-gib", "1e-9", "--out", str(tmp_path / "a")])
    with pytest.raises(MemoryError, match="One row's own TinT step needs about"):
        main(["ppl", *common, "--block-size", "32", "--max-blocks", "2", "--tint-memory-gib", "1e-9"])
    assert main([*eval_args, "--tint-memory-gib", "0.015", "--out", str(tmp_path / "b")]) == 0  # 1 row per call
    assert main([*eval_args, "--out", str(tmp_path / "c")]) == 0
    split, whole = (json.loads((tmp_path / d / "results.json").read_text())["runs"] for d in "bc")
    assert [r["accuracy"] for r in split] == [r["accuracy"] for r in whole]


def test_eval_errors_name_the_fix(checkpoint, tmp_path, capsys):
    common = ["eval", "--model", str(checkpoint), "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main(common + ["--tasks", "MR", "--modes", "magic"])
    assert "--modes: 'magic': use a comma-separated subset of icl, dynamic, tint" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--layers 5: .* pass --num-steps"):
        main(common + ["--tasks", "MR", "--modes", "dynamic", "--layers", "5"])
    with pytest.raises(SystemExit, match="Pass --tasks"):
        main(common)
    with pytest.raises(KeyError, match="Unknown task 'IMDB'"):
        main(common + ["--tasks", "IMDB", "--data-dir", str(FIXTURES)])
    with pytest.raises(ValueError, match="prepare-data"):
        main(common + ["--tasks", "CR", "--data-dir", str(FIXTURES)])
    # the executable reports the same errors as one line, no traceback
    assert console_main(common + ["--tasks", "IMDB", "--data-dir", str(FIXTURES)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("tint-hf: error: Unknown task 'IMDB'")


def test_ppl_dynamic_with_zero_lr_equals_the_model_as_is(checkpoint, tmp_path):
    out = tmp_path / "ppl"
    assert main(["ppl", "--model", str(checkpoint), "--modes", "icl,dynamic", "--lrs", "0,0.01", "--block-size", "32",
                 "--max-blocks", "3", "--quiet", "--out", str(out)]) == 0
    results = {(r["mode"], r["lr"]): r for r in json.loads((out / "results.json").read_text())["results"]}
    assert results["dynamic", 0.0]["perplexity"] == pytest.approx(results["icl", None]["perplexity"], rel=1e-6)
    assert results["dynamic", 0.01]["perplexity"] != pytest.approx(results["icl", None]["perplexity"], rel=1e-6)
    assert results["icl", None]["tokens"] == 3 * 16


def test_ppl_grid_resumes_adds_cells_and_refuses_other_inputs(checkpoint, tmp_path, capsys):
    """Train fractions x block seeds x lrs: each cell once in records.jsonl; a later call adds cells and reads the
    finished ones back (equal values); another text in the same --out is refused, --overwrite starts afresh."""
    out = tmp_path / "ppl"
    common = ["ppl", "--model", str(checkpoint), "--block-size", "32", "--max-blocks", "2", "--quiet",
              "--out", str(out), "--modes", "icl,dynamic", "--lrs", "0.01"]
    assert main(common + ["--train-fraction", "0.25,0.75", "--seeds", "1,2"]) == 0
    first = {r["key"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert len(first) == 2 * 2 * 2
    # the evaluated tokens follow the fraction: floor(0.25 * 32) = 8 training tokens -> 24 targets per block
    assert {r["train_fraction"]: r["tokens"] for r in first.values()} == {0.25: 2 * 24, 0.75: 2 * 8}
    capsys.readouterr()
    assert main(common + ["--train-fraction", "0.25,0.5", "--seeds", "1,2"]) == 0
    assert "resuming" in capsys.readouterr().out
    second = {r["key"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert {k: second[k] for k in second if k in first} == {k: first[k] for k in second if k in first}
    assert len((out / "records.jsonl").read_text().splitlines()) == 2 * 3 * 2
    text = tmp_path / "other.txt"
    text.write_text("Another corpus, long enough for a few blocks of thirty-two tokens. " * 40)
    with pytest.raises(RunStoreError, match="text"):
        main(common + ["--text-file", str(text)])
    with pytest.raises(RunStoreError, match="block_size"):
        main(common[:4] + ["24"] + common[5:])
    assert main(common + ["--text-file", str(text), "--overwrite"]) == 0
    assert len((out / "records.jsonl").read_text().splitlines()) == 2


def test_layers_without_a_whole_number_of_paper_steps_are_refused(checkpoint):
    """--layers L takes the paper's 12 / L steps; L = 5 gives none, so it needs an explicit --num-steps."""
    with pytest.raises(SystemExit, match=r"--layers 5: the paper's budget of 12 layer-steps .*pass --num-steps"):
        main(["ppl", "--model", str(checkpoint), "--modes", "dynamic", "--layers", "5", "--quiet"])


def test_prepare_data_converts_to_the_canonical_layout(tmp_path):
    assert main(["prepare-data", "--tasks", "MR", "--data-dir", str(FIXTURES), "--out", str(tmp_path)]) == 0
    task = get_task("MR")
    for split in ("train", "eval"):
        assert load_examples(task, split, data_dir=tmp_path) == load_examples(task, split, data_dir=FIXTURES)
    assert sorted(p.name for p in (tmp_path / "MR").iterdir()) == ["test.jsonl", "train.jsonl"]


def test_grid_and_both_selection_rules(checkpoint, tmp_path):
    """--layers x --variant x --loss grid points, each with a dev-selected and a test-selected row; the test-selected
    learning rate maximises the recorded test accuracies, and its row reports exactly that maximum."""
    out = tmp_path / "grid"
    assert main(["eval", "--model", str(checkpoint), "--tasks", "MR", "--data-dir", str(FIXTURES),
                 "--modes", "dynamic,tint", "--layers", "1,2", "--num-steps", "1", "--loss", "context,label",
                 "--variant", "single,concatenated", "--lrs", "0,0.5", "--label-lrs", "0,2", "--select", "both",
                 "--shots", "2", "--seeds", "1", "--n-eval", "8", "--n-dev", "4", "--batch-size", "4", "--quiet",
                 "--num-prefixes", "8", "--no-plot", "--out", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    labels = list(dict.fromkeys(r["mode"] for r in runs))
    assert labels == [f"{m}/{variant}L{n}x1" for m in ("dynamic", "tint") for n in (1, 2)
                      for variant in ("single/", "single/label/", "", "label/")]
    for run in runs:
        config = run["mode_config"]
        assert config["num_layers"] in (1, 2) and config["num_steps"] == 1
        assert sorted(map(float, run["selection_accuracy"])) == ([0.0, 2.0] if config["loss"] == "label"
                                                                  else [0.0, 0.5])
        if run["selection"] == "test":
            best = max(run["selection_accuracy"].values())
            assert run["accuracy"] == pytest.approx(best)
            assert run["selection_accuracy"][repr(run["lr"])] == best
        else:
            assert run["selection"] == "dev" and run["dev_accuracy"] == run["selection_accuracy"]
    assert sorted({r["selection"] for r in runs}) == ["dev", "test"]
    assert len(runs) == 2 * 2 * 2 * 2 * 2  # modes x layers x variants x losses x selections
    summary = (out / "summary.md").read_text()
    assert "| dev |" in summary and "| test |" in summary


def test_an_interrupted_run_resumes_and_other_settings_are_refused(checkpoint, tmp_path):

    out = tmp_path / "resume"
    args = ["eval", "--model", str(checkpoint), "--tasks", "MR", "--data-dir", str(FIXTURES), "--modes",
            "icl,dynamic", "--shots", "0,2", "--seeds", "1,2", "--lrs", "0,0.05", "--n-eval", "8", "--n-dev", "4",
            "--quiet", "--no-plot", "--out", str(out)]
    assert main(args) == 0
    complete = json.loads((out / "results.json").read_text())["runs"]
    cells = (out / "cells.jsonl").read_text().splitlines()
    assert len(cells) == 6  # (icl, dynamic) x (k=0 seed 1, k=2 seeds 1 and 2)
    # a kill during the 5th cell: four finished lines and half a line
    (out / "cells.jsonl").write_text("\n".join(cells[:4]) + "\n" + cells[4][: len(cells[4]) // 2])
    def computed(before: int) -> list[tuple[str, str, str]]:
        """(mode, k, seed) of the cells a call appended to cells.jsonl (one record per computed cell)."""
        lines = (out / "cells.jsonl").read_text().splitlines()[before:]
        return [tuple(json.loads(line)["key"].split("|")[1:]) for line in lines]

    with pytest.warns(UserWarning, match=r"cells.jsonl:5: dropping a record cut short"):
        assert main(args) == 0
    assert computed(4) == [("dynamic", "k=2", "seed=1"), ("dynamic", "k=2", "seed=2")]
    assert [json.loads(line)["key"] for line in (out / "cells.jsonl").read_text().splitlines()] == \
        [json.loads(line)["key"] for line in cells]  # the cut line is gone, the recomputed cells appended cleanly
    resumed = json.loads((out / "results.json").read_text())["runs"]
    assert resumed == complete
    # another choice of cells (here: a mode added, one seed) extends the folder: only the new cells are computed
    extended = [a if a != "icl,dynamic" else "icl,tint" for a in args]
    extended[extended.index("--seeds") + 1] = "1"
    assert main(extended) == 0
    assert computed(6) == [("tint", "k=0", "seed=1"), ("tint", "k=2", "seed=1")]
    assert len((out / "cells.jsonl").read_text().splitlines()) == 8
    complete = json.loads((out / "results.json").read_text())["runs"]
    # a manifest written before a setting was renamed (n_steps, now num_steps) resumes as the same settings
    manifest = json.loads((out / "run.json").read_text())
    manifest["settings"]["n_steps"] = manifest["settings"].pop("num_steps")
    (out / "run.json").write_text(json.dumps(manifest))
    assert main(extended) == 0 and computed(8) == []
    with pytest.raises(RunStoreError, match=r"other settings \(lrs: \[0.0, 0.05\] -> \[0.0, 0.1\]\).*--overwrite"):
        main([a if a != "0,0.05" else "0,0.1" for a in args])
    assert json.loads((out / "results.json").read_text())["runs"] == complete  # untouched
    assert main([a if a != "0,0.05" else "0,0.1" for a in args] + ["--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["lrs"] == [0.0, 0.1]


def test_a_resumed_eval_refuses_changed_inputs_and_damaged_cells(checkpoint, tmp_path):
    """The cells of a run are read back only for the same data, model weights and tokenizer (content hashes in
    run.json), and damaged or conflicting lines are named, not skipped or overridden."""
    import shutil

    data, model = tmp_path / "data", tmp_path / "model"
    shutil.copytree(FIXTURES, data)
    shutil.copytree(checkpoint, model)
    out = tmp_path / "run"
    args = ["eval", "--model", str(model), "--tasks", "MR", "--data-dir", str(data), "--modes", "icl",
            "--shots", "0", "--seeds", "1", "--n-eval", "8", "--quiet", "--no-plot", "--out", str(out)]
    assert main(args) == 0
    assert main(args) == 0  # unchanged: resumes
    test_file = data / "MR" / "test.csv"
    original = test_file.read_text()
    test_file.write_text(original.replace("delightful", "delighted", 1))  # one word edited in the evaluation pool
    with pytest.raises(RunStoreError, match=r"another data/MR .*--overwrite"):
        main(args)
    test_file.write_text(original)
    weights = model / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1e-3
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(RunStoreError, match=r"another model "):
        main(args)
    shutil.copytree(checkpoint, model, dirs_exist_ok=True)
    assert main(args) == 0
    cells = out / "cells.jsonl"
    line = json.loads(cells.read_text().splitlines()[0])
    conflicting = json.dumps({**line, "runs": [{**line["runs"][0], "accuracy": 0.0}]})
    cells.write_text(cells.read_text() + conflicting + "\n")
    with pytest.raises(RunStoreError, match=r"cells.jsonl: lines 1 and 2 hold different results for 'MR\|icl"):
        main(args)
    cells.write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n")  # an identical duplicate is harmless
    assert main(args) == 0 and len(cells.read_text().splitlines()) == 1
    cells.write_text(json.dumps(line) + "\n" + json.dumps({"runs": []}) + "\n")
    with pytest.raises(RunStoreError, match=r"cells.jsonl:2 is not a record of this run"):
        main(args)
    cells.write_text("{broken\n" + json.dumps(line) + "\n")
    with pytest.raises(RunStoreError, match=r"cells.jsonl:1 is not valid JSON"):
        main(args)
    (out / "run.json").write_text("{")
    with pytest.raises(RunStoreError, match=r"run.json is damaged"):
        main(args)
    assert console_main(args[:-1] + [str(test_file)]) == 2  # --out an existing file


def test_the_tint_paper_preset_sets_the_protocol_and_explicit_arguments_win():
    import argparse

    from tint_hf.commands.common import layer_grid, resolve_defaults
    from tint_hf.commands.eval import add_arguments, mode_configs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = resolve_defaults(parser.parse_args(["--preset", "tint-paper", "--model", "m", "--out", "o",
                                               "--tasks", "SST2,MR"]))
    assert args.tasks == ("SST2", "MR") and args.shots == (0, 32) and args.seeds == (1, 2, 3)
    assert (args.n_eval, args.calibration, args.select, args.legacy_sampler) == (200, "icl_sfc", "both", True)
    assert layer_grid(args) == [(12, 1), (6, 2), (3, 4)]
    configs = mode_configs(args)
    # the authors' pairing: TinT's context loss trains on the query (both variants), dynamic evaluation's does not
    assert [c.label for c in configs[:5]] == ["icl", "dynamic/single/L12x1", "dynamic/single/label/L12x1",
                                              "dynamic/L12x1", "dynamic/label/L12x1"]
    assert [c.label for c in configs[13:17]] == ["tint/single/query/L12x1", "tint/single/label/L12x1",
                                                 "tint/query/L12x1", "tint/label/L12x1"]
    assert len(configs) == 1 + 2 * 3 * 2 * 2
    matched = mode_configs(resolve_defaults(parser.parse_args(["--preset", "tint-paper", "--model", "m", "--out",
                                                               "o", "--train-on-query", "dynamic"])))
    assert "dynamic/single/query/L12x1" in [c.label for c in matched] and not any("tint/" in c.label and "query"
                                                                                   in c.label for c in matched)
    both = resolve_defaults(parser.parse_args(["--model", "m", "--out", "o", "--train-on-query"]))
    assert both.train_on_query == ("dynamic", "tint")
    neither = mode_configs(resolve_defaults(parser.parse_args(["--preset", "tint-paper", "--model", "m", "--out",
                                                               "o", "--train-on-query", "none"])))
    assert not any(c.train_on_query for c in neither)
    label = next(c for c in configs if c.loss == "label")
    context = next(c for c in configs if c.adaptive and c.loss == "context")
    assert label.lrs == (1e-3, 1e-4, 1e-5) and context.lrs == (1e-5, 1e-6, 1e-7)
    plain = resolve_defaults(parser.parse_args(["--model", "m", "--out", "o"]))
    assert (plain.select, plain.calibration, plain.layers, plain.legacy_sampler) == ("dev", "none", None, False)


@pytest.mark.parametrize("extra, option", [
    (["--modes", "icl,dynamic", "--tint-model", "x"], "--tint-model"),
    (["--modes", "tint", "--tint-model", "x", "--num-prefixes", "8"], "--num-prefixes"),
    (["--modes", "icl", "--num-prefixes", "8"], "--num-prefixes"),
    (["--modes", "icl,tint", "--tint-approximations"], "--tint-approximations"),
    (["--modes", "dynamic", "--label-lrs", "1e-3"], "--label-lrs"),
    (["--modes", "icl,dynamic", "--train-on-query", "tint"], "--train-on-query"),
    (["--modes", "icl,dynamic", "--tint-memory-gib", "1"], "--tint-memory-gib"),
])
def test_options_the_call_would_ignore_are_refused(extra, option, tmp_path):
    with pytest.raises(SystemExit, match=f"{option} would be ignored in this call"):
        main(["eval", "--model", "m", "--tasks", "MR", "--out", str(tmp_path / "o"), *extra])
    if "--label-lrs" not in extra and "--train-on-query" not in extra:  # ppl shares the model options
        with pytest.raises(SystemExit, match=f"{option} would be ignored in this call"):
            main(["ppl", "--model", "m", *extra])
