"""``tint-hf ppl``: perplexity on a text corpus for the model as is, dynamic evaluation and TinT.

Blocks of ``--block-size`` tokens; the first ``--train-fraction`` of each block is the training part (context for
``icl``, the data of the SGD step for ``dynamic`` and ``tint``); perplexity is measured on the rest of each block.
Several train fractions, learning rates and block seeds make a grid; with ``--out`` every finished cell is recorded in
a run store (:mod:`tint_hf.runstore`), so a stopped run resumes and a run on other inputs is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..assets import sample_text
from ..evaluation import DynamicSGD, PlainLM, TinTForward, block_perplexity, text_blocks
from ..evaluation.perplexity import perplexity_table, summarize_perplexity
from ..evaluation.report import environment
from ..runstore import fingerprint_json
from ..simulate import Approximations
from .arguments import at_least, comma_list, fraction
from .common import (
    add_model_arguments,
    check_loaded,
    given_options,
    layer_grid,
    load_model,
    load_tint,
    open_store,
    refuse_ignored,
    resolve_defaults,
    settings_of,
    tint_memory_budget,
)

HELP = "Perplexity with in-context adaptation (icl = model as is, dynamic, tint) on blocks of a text corpus."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--text-file", type=Path, default=None,
                        help="UTF-8 text corpus (default: the shipped CC0 State of the Union sample).")
    parser.add_argument("--block-size", type=at_least(2), default=256)
    parser.add_argument("--train-fraction", type=comma_list(fraction, unique=True), default=(0.5,),
                        help="Fraction(s) of each block that form the training part, e.g. 0.25,0.5,0.75 (the paper's); "
                             "default 0.5.")
    parser.add_argument("--max-blocks", type=at_least(1), default=None,
                        help="Blocks per seed (default: every block of the text).")
    parser.add_argument("--seeds", dest="block_seeds", type=comma_list(at_least(0), unique=True), default=None,
                        help="Block seeds: each cuts the text at its own random offset and draws --max-blocks blocks "
                             "at random (default: one run on the blocks from the start of the text).")
    parser.add_argument("--out", type=Path, default=None,
                        help="Run folder: run.json, records.jsonl (one per cell; a stopped run resumes from them), "
                             "results.json and summary.md.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Discard a previous run with other settings in --out instead of refusing.")


# Which cells a call runs: each record's key names them, so a later call in the same --out may add cells.
CELL_SELECTION = ("modes", "lrs", "train_fraction", "block_seeds", "max_blocks")


def run(args: argparse.Namespace) -> int:
    given = given_options(args)
    resolve_defaults(args)
    refuse_ignored(args, given)
    if len(args.layers or ()) > 1:
        raise SystemExit(f"--layers {','.join(map(str, args.layers))}: ppl takes one value (run it once per value).")
    ((num_layers, num_steps),) = layer_grid(args)
    if args.text_file is not None and not args.text_file.is_file():
        raise SystemExit(f"--text-file {args.text_file} does not exist.")
    model, tokenizer = load_model(args)
    text = args.text_file.read_text(encoding="utf-8") if args.text_file else sample_text()
    tint = load_tint(args, model)
    if callable(tint) and not isinstance(tint, torch.nn.Module):
        tint = tint(num_layers, num_steps)
    store = None
    if args.out is not None:
        store = open_store(args, "records.jsonl", ("results.json", "summary.md"), CELL_SELECTION)
        check_loaded(store, model, tokenizer, tint)
        store.check_provenance("text", fingerprint_json(text))
    approx = Approximations() if args.tint_approximations else None
    records = []
    for seed in args.block_seeds or (None,):
        blocks = text_blocks(tokenizer, text, args.block_size, args.max_blocks, seed)
        for train_fraction in args.train_fraction:
            for mode in args.modes:
                for lr in (None,) if mode == "icl" else args.lrs:
                    key = f"{mode}|lr={lr}|fraction={train_fraction}|seed={seed}|blocks={len(blocks)}"
                    record = store.get(key) if store is not None else None
                    if record is None:
                        if mode == "icl":
                            scorer = PlainLM(model)
                        elif mode == "dynamic":
                            scorer = DynamicSGD(model, lr, num_steps, num_layers, approximations=approx)
                        else:
                            scorer = TinTForward(tint, lr, memory_budget=tint_memory_budget(args))
                        out = block_perplexity(scorer, blocks, train_fraction, batch_size=args.batch_size,
                                               desc=f"{mode} lr={lr} fraction={train_fraction} seed={seed}",
                                               progress=not args.quiet)
                        record = dict(mode=mode, lr=lr, train_fraction=train_fraction, seed=seed,
                                      blocks=len(blocks), **out)
                        if store is not None:
                            record = store.put(key, record)
                    records.append(record)
                    print(f"{mode:8s} lr={lr!s:8s} fraction={train_fraction} seed={seed}: perplexity "
                          f"{record['perplexity']:.3f} on {record['tokens']} tokens")
    summary = summarize_perplexity(records)
    table = perplexity_table(summary)
    print(table)
    if args.out:
        (args.out / "results.json").write_text(json.dumps(dict(arguments=settings_of(args), environment=environment(),
                                                               summary=summary, results=records), indent=2) + "\n")
        (args.out / "summary.md").write_text(table)
    return 0
