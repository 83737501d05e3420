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
    """Markdown table: accuracy mean +- std over seeds (percent), macro-F1, chance level, and where each seed's
    learning rate was chosen (dev, test = the authors' oracle selection, - = nothing to choose)."""
    lines = ["| task | mode | k | lr chosen on | accuracy (%) | macro-F1 (%) | chance (%) | seeds | n | lr |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary:
        lrs = sorted({lr for lr in row["lrs"] if lr is not None})
        lines.append(f"| {row['task']} | {row['mode']} | {row['shots']} | {row.get('selection') or '-'} | "
                     f"{100 * row['accuracy_mean']:.1f} ± "
                     f"{100 * row['accuracy_std']:.1f} | {100 * row['macro_f1_mean']:.1f} | {100 * row['chance']:.0f} "
                     f"| {row['seeds']} | {row['n']} | {', '.join(f'{lr:g}' for lr in lrs) or '-'} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(summary: Sequence[dict], path: Path) -> None:
    """Grouped bars: one group per task, one bar per (mode, k, selection rule), error bars = std over seeds, dashed
    chance line."""
    matplotlib = require("matplotlib", "plot", "The accuracy plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in summary))
    series = list(dict.fromkeys((r["mode"], r["shots"], r.get("selection")) for r in summary))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(tasks) * max(1, len(series) / 3)), 4.0))
    for s, (mode, shots, selection) in enumerate(series):
        rows = {r["task"]: r for r in summary if (r["mode"], r["shots"], r.get("selection")) == (mode, shots, selection)}
        xs = [t + (s - (len(series) - 1) / 2) * width for t in range(len(tasks)) if tasks[t] in rows]
        ax.bar(xs, [100 * rows[t]["accuracy_mean"] for t in tasks if t in rows], width,
               yerr=[100 * rows[t]["accuracy_std"] for t in tasks if t in rows], label=f"{mode}, k={shots}" + (f", lr on {selection}" if selection else ""), capsize=2)
    for t, task in enumerate(tasks):
        chance = 100 * next(r["chance"] for r in summary if r["task"] == task)
        ax.hlines(chance, t - 0.45, t + 0.45, colors="grey", linestyles="dashed")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small", ncol=min(4, len(series)), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
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
