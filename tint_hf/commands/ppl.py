"""``tint-hf ppl``: perplexity on a text corpus for the model as is, dynamic evaluation and TinT.

Blocks of ``--block-size`` tokens; the first ``--train-fraction`` of each block is the training part (context for
``icl``, the data of the SGD step for ``dynamic`` and ``tint``); perplexity is measured on the rest of each block.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..assets import sample_text
from ..evaluation import DynamicSGD, PlainLM, TinTForward, block_perplexity, text_blocks
from ..evaluation.report import environment
from ..simulate import Approximations
from .arguments import at_least, fraction
from .eval import (
    add_model_arguments,
    given_options,
    layer_grid,
    load_model,
    load_tint,
    refuse_ignored,
    resolve_defaults,
)

HELP = "Perplexity with in-context adaptation (icl = model as is, dynamic, tint) on blocks of a text corpus."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--text-file", type=Path, default=None,
                        help="UTF-8 text corpus (default: the shipped CC0 State of the Union sample).")
    parser.add_argument("--block-size", type=at_least(2), default=256)
    parser.add_argument("--train-fraction", type=fraction, default=0.5)
    parser.add_argument("--max-blocks", type=at_least(1), default=None)
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")


def run(args: argparse.Namespace) -> int:
    given = given_options(args)
    resolve_defaults(args)
    refuse_ignored(args, given)
    if len(args.layers or ()) > 1:
        raise SystemExit(f"--layers {','.join(map(str, args.layers))}: ppl takes one value (run it once per value).")
    ((n_layers, n_steps),) = layer_grid(args)
    if args.text_file is not None and not args.text_file.is_file():
        raise SystemExit(f"--text-file {args.text_file} does not exist.")
    model, tokenizer = load_model(args)
    text = args.text_file.read_text(encoding="utf-8") if args.text_file else sample_text()
    blocks = text_blocks(tokenizer, text, args.block_size, args.max_blocks)
    tint = load_tint(args, model)
    if callable(tint) and not isinstance(tint, torch.nn.Module):
        tint = tint(n_layers, n_steps)
    approx = Approximations() if args.tint_approximations else None
    results = []
    for mode in args.modes:
        for lr in (None,) if mode == "icl" else args.lrs:
            if mode == "icl":
                scorer = PlainLM(model)
            elif mode == "dynamic":
                scorer = DynamicSGD(model, lr, n_steps, n_layers, approximations=approx)
            else:
                scorer = TinTForward(tint, lr)
            out = block_perplexity(scorer, blocks, args.train_fraction, batch_size=args.batch_size,
                                   desc=f"{mode} lr={lr}", progress=not args.quiet)
            results.append(dict(mode=mode, lr=lr, **out))
            print(f"{mode:8s} lr={lr!s:8s} perplexity {out['perplexity']:.3f} on {out['tokens']} tokens")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.out.write_text(json.dumps(dict(arguments=arguments, environment=environment(), blocks=len(blocks),
                                            results=results), indent=2) + "\n")
    return 0
