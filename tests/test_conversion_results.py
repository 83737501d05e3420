"""tint_hf.conversion_results summarises a conversion study's results.json: on the committed study it gives exactly
the cells and paired differences of bench/mesa_conversion/results.md, which the bench printed before these
summaries moved into the package (so the bench's report and the model card read the same numbers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tint_hf.conversion_results import LABELS, STAGES, mean_std, paired, stage_table

STUDY = Path(__file__).resolve().parents[1] / "bench" / "mesa_conversion"


def printed_tables() -> dict[str, dict[str, dict[str, str]]]:
    """Layer set -> row label -> column -> cell, parsed from results.md."""
    tables, layers, header = {}, None, None
    for line in (STUDY / "results.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("Layers "):
            layers = line.removeprefix("Layers ").rstrip(":")
            tables[layers] = {}
        elif line.startswith("| model"):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[layers][cells[0]] = dict(zip(header, cells, strict=True))
    return tables


def test_stage_cells_are_those_the_study_printed():
    result = json.loads((STUDY / "results.json").read_text())
    tables = printed_tables()
    assert set(tables) == set(result["references"]) == {"26-29", "22-29"}
    for layers, printed in tables.items():
        ours = stage_table(result, layers)
        assert set(ours) == set(printed)
        for row, cells in ours.items():
            for stage in STAGES if row in LABELS.values() else ("init",):
                assert cells[stage] == printed[row][stage], (layers, row, stage)


@pytest.mark.parametrize(("kind", "against"), [("cg", "gd"), ("cg", "zero"), ("exact", "cg")])
def test_paired_differences_are_those_the_study_printed(kind, against):
    result = json.loads((STUDY / "results.json").read_text())
    text = (STUDY / "results.md").read_text(encoding="utf-8")
    for layers in ("26-29", "22-29"):
        section = text.split(f"Layers {layers}:")[1].split("Layers ")[0]
        (line,) = [row for row in section.splitlines() if row.startswith(f"* {LABELS[kind]} minus {LABELS[against]},")]
        printed = re.search(r"final perplexity (\S+ ± \S+) \((\d+) seeds\)", line)
        diff = paired(result, layers, kind, against)["perplexity"]
        assert (mean_std(diff, 2), str(len(diff))) == printed.groups()


def test_mean_std_formats_one_several_and_no_values():
    assert mean_std([], 2) == "" and mean_std([1.234], 2) == "1.23" and mean_std([1.0, 3.0], 1) == "2.0 ± 1.4"
