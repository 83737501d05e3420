"""Summaries of a mesa conversion study's ``results.json`` (written by ``bench/mesa_conversion.py``), shared by the
bench's report and the model card that quotes it, so a rerun of the study updates both.

A study holds, per layer set (e.g. ``"26-29"``), the references (``teacher``, ``attention zeroed, untrained``: their
held-out perplexity, NLL by position band and context gain) and one run per (kind, seed) with the perplexity after
each stage. :func:`stage_table` gives the cells of the report's table (mean ± std over seeds, as printed);
:func:`paired` the differences between two kinds, seed by seed.
"""

from __future__ import annotations

import statistics

STAGES = ("init", "calibrate", "transfer", "finetune")
SOLVERS = ("cg", "gd", "exact")
KINDS = (*SOLVERS, *(f"{solver}-mlp" for solver in SOLVERS), "cg+window", "window", "zero", "original")
LABELS = {"zero": "attention zeroed, MLP LoRA + KL", "original": "original, MLP LoRA + KL",
          "cg+window": "mesa `cg` + softmax window", "window": "softmax window only",
          **{solver: f"mesa `{solver}`" for solver in SOLVERS},
          **{f"{solver}-mlp": f"mesa `{solver}`, MLP LoRA" for solver in SOLVERS}}


def mean_std(values: list[float], digits: int) -> str:
    """``"m ± s"`` over several values, the value alone for one, "" for none."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def runs_of(result: dict, layers: str, kind: str) -> list[dict]:
    return [r for r in result["runs"] if r["layers"] == layers and r["run"] == kind]


def stage_table(result: dict, layers: str) -> dict[str, dict[str, str]]:
    """Row label -> stage -> held-out perplexity cell (references: "init" only), as the report prints them."""
    table = {name: {"init": f"{facts['perplexity']:.2f}"} for name, facts in result["references"][layers].items()}
    for kind in KINDS:
        runs = runs_of(result, layers, kind)
        if runs:
            table[LABELS[kind]] = {stage: mean_std([r["perplexity"][stage] for r in runs if stage in r["perplexity"]], 2)
                                   for stage in STAGES}
    return table


def paired(result: dict, layers: str, kind: str, against: str) -> dict[str, list[float]]:
    """Seed-by-seed differences ``kind`` minus ``against`` (same batches): final perplexity and context gain."""
    pairs = [(a, b) for a in runs_of(result, layers, kind) for b in runs_of(result, layers, against)
             if a["seed"] == b["seed"]]
    return {"perplexity": [a["perplexity"]["finetune"] - b["perplexity"]["finetune"] for a, b in pairs],
            "gain": [a["context"]["gain"] - b["context"]["gain"] for a, b in pairs if "context" in a and "context" in b]}


def context_gain(result: dict, layers: str, name: str) -> list[float]:
    """The context gains recorded for a reference (by name) or a run kind (over its seeds that have one)."""
    references = result["references"][layers]
    if name in references:
        return [references[name]["context"]["gain"]]
    return [r["context"]["gain"] for r in runs_of(result, layers, name) if "context" in r]


__all__ = ["KINDS", "LABELS", "STAGES", "context_gain", "mean_std", "paired", "runs_of", "stage_table"]
