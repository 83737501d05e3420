"""``tint-hf lm-eval``: lm-evaluation-harness's own command line, with tint_hf's ``tint-hf`` model registered.

    tint-hf lm-eval run --model tint-hf --model_args pretrained=PATH,mode=tint,inner_lr=1e-4 --tasks NAME ...

Every argument after ``lm-eval`` goes to lm-eval unchanged (``tint-hf lm-eval --help`` shows lm-eval's help); the model
arguments are those of :class:`tint_hf.evaluation.lm_eval_models.AdaptiveLM`.
"""

from __future__ import annotations

import argparse
import sys

HELP = "lm-evaluation-harness with the `tint-hf` model (modes icl / dynamic / tint) registered; arguments go to lm-eval."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="Arguments of lm-eval (e.g. run --model ...).")


def run(args: argparse.Namespace) -> int:
    from .._optional import require

    require("lm_eval", "lm-eval", "tint-hf lm-eval")
    from lm_eval.__main__ import cli_evaluate

    from ..evaluation import lm_eval_models  # noqa: F401  (registers the "tint-hf" model)

    argv = sys.argv
    sys.argv = ["lm-eval", *args.lm_eval_args]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
    return 0
