"""Result files: ``results.json`` (every argument, versions, runs, summary), ``predictions.jsonl`` (one line per
example), ``summary.md`` (task x mode x shots table) and ``accuracy.png`` (accuracy per task and mode)."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path

from .._optional import require


def environment() -> dict:
    """Library versions that can move the numbers."""
    import datasets
    import torch
    import transformers

    from .. import __version__

    return dict(tint_hf=__version__, torch=torch.__version__, transformers=transformers.__version__,
                datasets=datasets.__version__, python=platform.python_version())


def markdown_table(summary: Sequence[dict]) -> str:
    """Markdown table: accuracy mean +- std over seeds (percent), macro-F1, chance level, where each seed's
    learning rate was chosen (dev, test = the authors' oracle selection, - = nothing to choose), the chosen learning
    rates and how many seeds chose one at the edge of the grid (the optimum may lie outside it)."""
    lines = ["| task | mode | k | lr chosen on | accuracy (%) | macro-F1 (%) | chance (%) | seeds | n | lr |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary:
        lrs = sorted({lr for lr in row["lrs"] if lr is not None})
        edge = f" ({row['lr_at_edge']}/{row['seeds']} at the grid's edge)" if row.get("lr_at_edge") else ""
        lines.append(f"| {row['task']} | {row['mode']} | {row['shots']} | {row.get('selection') or '-'} | "
                     f"{100 * row['accuracy_mean']:.1f} ± "
                     f"{100 * row['accuracy_std']:.1f} | {100 * row['macro_f1_mean']:.1f} | {100 * row['chance']:.0f} "
                     f"| {row['seeds']} | {row['n']} | {', '.join(f'{lr:g}' for lr in lrs) or '-'}{edge} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(summary: Sequence[dict], path: Path, selection: str = "dev") -> None:
    """One panel per shot count; in each, the tasks side by side, one bar per method that has cells there (no empty
    slots), error bars = std over seeds, a dashed chance line per task. Methods with a learning-rate grid show the
    rows of one ``selection`` rule (``dev`` by default, ``test`` when only those exist)."""
    matplotlib = require("matplotlib", "plot", "The accuracy plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = {r.get("selection") for r in summary} - {None}
    rule = selection if selection in rules or not rules else sorted(rules)[0]
    rows = [r for r in summary if r.get("selection") in (None, rule)]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    shots = sorted({r["shots"] for r in rows})
    methods = list(dict.fromkeys(r["mode"] for r in rows))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    width = max(6.5, 1.6 + 1.5 * len(tasks))
    fig, axes = plt.subplots(len(shots), 1, figsize=(width, 2.8 * len(shots) + 0.8), squeeze=False, sharey=True)
    for ax, k in zip(axes[:, 0], shots, strict=True):
        cells = {(r["task"], r["mode"]): r for r in rows if r["shots"] == k}
        present = [m for m in methods if any((t, m) in cells for t in tasks)]
        bar = 0.8 / len(present)
        for i, method in enumerate(present):
            xs = [t for t, task in enumerate(tasks) if (task, method) in cells]
            values = [cells[(tasks[t], method)] for t in xs]
            ax.bar([x + (i - (len(present) - 1) / 2) * bar for x in xs], [100 * v["accuracy_mean"] for v in values],
                   bar, yerr=[100 * v["accuracy_std"] for v in values], capsize=2, color=colors[method],
                   label=method)
        for t, task in enumerate(tasks):
            chance = 100 * next(r["chance"] for r in rows if r["task"] == task)
            ax.hlines(chance, t - 0.45, t + 0.45, colors="grey", linestyles="dashed")
        ax.set_title(f"k = {k}" + (f" (learning rates chosen on {rule})" if rule else ""), fontsize="medium")
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
    handles = {m: plt.Rectangle((0, 0), 1, 1, color=colors[m]) for m in methods}
    handles["chance"] = plt.Line2D([0], [0], color="grey", linestyle="dashed")
    columns = max(1, min(len(handles), int(width // 2.2)))
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=columns, fontsize="small",
               bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.05 + 0.045 * (-(-len(handles) // columns)), 1, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_results(out_dir: str | Path, arguments: dict, runs: Sequence[dict], predictions: Sequence[dict],
                  summary: Sequence[dict], plot: bool = True) -> Path:
    """Write results.json, predictions.jsonl, summary.md and (``plot``) accuracy.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(arguments=arguments, environment=environment(), summary=list(summary), runs=list(runs))
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    with (out / "predictions.jsonl").open("w") as f:
        for row in predictions:
            f.write(json.dumps(row) + "\n")
    (out / "summary.md").write_text(markdown_table(summary))
    if plot:
        plot_accuracy(summary, out / "accuracy.png")
    return out
