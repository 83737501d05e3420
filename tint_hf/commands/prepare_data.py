"""``tint-hf prepare-data``: save tasks' data in the canonical offline layout ``OUT/<Task>/{train,test}.jsonl``.

With internet, ``--hub`` downloads the real datasets via ``datasets.load_dataset``; copy OUT to the offline machine
and pass it as ``tint-hf eval --data-dir OUT``. Local sources (``--data-dir``, any supported format) are converted too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation import get_task, load_examples, write_jsonl
from .arguments import names

HELP = "Save task data as OUT/<Task>/{train,test}.jsonl for offline evaluation (from the HF Hub or local files)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=names, required=True, help="Comma-separated task names.")
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hub", action="store_true", help="Download from the HF Hub (needs internet).")
    source.add_argument("--data-dir", type=Path, help="Convert local data (DATA_DIR/<Task>/..., any format).")
    parser.add_argument("--text-field", default=None)
    parser.add_argument("--label-field", default="label")


def run(args: argparse.Namespace) -> int:
    for name in args.tasks:
        task = get_task(name)
        for split, file_name in (("train", "train.jsonl"), ("eval", "test.jsonl")):
            examples = load_examples(task, split, data_dir=args.data_dir, hub=args.hub, text_field=args.text_field,
                                     label_field=args.label_field)
            n = write_jsonl(examples, args.out / task.name / file_name)
            print(f"{task.name} {split}: {n} examples -> {args.out / task.name / file_name}")
    return 0
