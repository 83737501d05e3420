"""Summary table, paper-style table and plot of `tint-hf eval` output folders, finished or not (from cells.jsonl).

    python bench/eval_report.py outputs/eval_paper_smollm2 [more folders] [--plot accuracy.png]

Several folders (e.g. a zero-shot and a 32-shot run) are reported together; a cell found in two folders is refused.

Prints the per-(task, mode, k, selection) summary and a paper-style table: one row per (mode, k, lr chosen on),
one column per task, accuracy mean ± std over seeds (percent).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tint_hf.evaluation import get_task, summarize_runs
from tint_hf.evaluation.report import markdown_table, plot_accuracy
from tint_hf.runstore import RunStore


def paper_table(summary: list[dict]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    rows = list(dict.fromkeys((r["mode"], r["shots"], r["selection"]) for r in summary))
    lines = ["| mode | k | lr chosen on | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 4) + "|"]
    for mode, shots, selection in rows:
        cells, means = [], []
        for task in tasks:
            hit = [r for r in summary if (r["task"], r["mode"], r["shots"], r["selection"]) == (task, mode, shots,
                                                                                                  selection)]
            if hit:
                means.append(100 * hit[0]["accuracy_mean"])
                cells.append(f"{means[-1]:.1f} ± {100 * hit[0]['accuracy_std']:.1f}")
            else:
                cells.append("-")
        mean = f"{sum(means) / len(means):.1f}" if len(means) == len(tasks) else "-"
        lines.append(f"| {mode} | {shots} | {selection or '-'} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="+")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    cells: dict[str, dict] = {}
    for folder in args.out:
        for key, cell in RunStore(folder, "cells.jsonl").records.items():
            if key in cells:
                parser.error(f"cell {key} is in two of the folders; report them separately")
            cells[key] = cell
    runs = [run for cell in cells.values() for run in cell["runs"]]
    summary = summarize_runs(runs, {r["task"]: get_task(r["task"]).num_classes for r in runs})
    print(markdown_table(summary))
    print(paper_table(summary))
    if args.plot:
        plot_accuracy(summary, args.plot)


if __name__ == "__main__":
    main()
