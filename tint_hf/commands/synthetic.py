"""``tint-hf synthetic EXPERIMENT``: the synthetic in-context-learning lab (see :mod:`tint_hf.synthetic.experiments`).

Writes ``<out>/<experiment>.json`` (every argument, versions, per-run curves and probes), ``<out>/<experiment>.md``
(the summary table) and ``<out>/<experiment>.png`` (unless ``--no-plot``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..evaluation.report import environment
from .arguments import Distinct, at_least, fraction, learning_rate, non_negative

HELP = ("Synthetic ICL lab: 'regression' (a linear self-attention layer vs gradient descent), 'dynamics' (softmax vs "
        "mesa on linear dynamical systems) or 'plateau' (learning plateaus and three ways out).")
EXPERIMENTS = ("regression", "dynamics", "plateau")


def _model_spec(text: str) -> tuple[str, int]:
    backbone, _, layers = text.partition(":")
    if backbone not in ("softmax", "mesa") or not layers.isdigit() or int(layers) < 1:
        raise argparse.ArgumentTypeError(f"--models entries are BACKBONE:LAYERS with BACKBONE softmax or mesa, got "
                                         f"{text!r} (e.g. softmax:2 mesa:1).")
    return backbone, int(layers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=EXPERIMENTS)
    parser.add_argument("--seeds", type=at_least(0), nargs="+", action=Distinct, default=[0, 1, 2])
    parser.add_argument("--steps", type=at_least(1), default=None,
                        help="Optimizer steps per run (default: regression 8000, dynamics 1500, plateau 3000).")
    parser.add_argument("--batch-size", type=at_least(1), default=None,
                        help="Sequences per step (default: regression 256, dynamics and plateau 64).")
    parser.add_argument("--lr", type=learning_rate, default=1e-3, help="AdamW learning rate (constant: plateaus are read off the curves).")
    parser.add_argument("--models", type=_model_spec, nargs="+", action=Distinct, default=None,
                        help="dynamics: BACKBONE:LAYERS entries (default: softmax:1 softmax:2 softmax:4 mesa:1 mesa:2).")
    parser.add_argument("--strategies", nargs="+", action=Distinct, default=None,
                        choices=("baseline", "warmup", "mix", "weights_loss"),
                        help="plateau: the training variants (default: all four).")
    parser.add_argument("--warmup-steps-fixed", type=at_least(0), default=300, help="plateau: D_fix steps of 'warmup'.")
    parser.add_argument("--mix-fraction", type=fraction, default=0.2, help="plateau: D_fix share of 'mix'.")
    parser.add_argument("--weights-loss", type=non_negative, default=0.1, help="plateau: weight of the auxiliary loss.")
    parser.add_argument("--out", type=Path, default=Path("synthetic_results"), help="Output folder.")
    parser.add_argument("--no-plot", action="store_true", help="Skip the PNG (no matplotlib needed).")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")


def run(args: argparse.Namespace) -> int:
    from ..synthetic import experiments

    if args.models is not None and args.experiment != "dynamics":
        raise ValueError("--models applies to the dynamics experiment only.")
    if args.strategies is not None and args.experiment != "plateau":
        raise ValueError("--strategies applies to the plateau experiment only.")
    if not args.no_plot:
        from .._optional import require

        require("matplotlib", "plot", "tint-hf synthetic's plots (or pass --no-plot)")
    common = dict(seeds=args.seeds, lr=args.lr, progress=not args.quiet)
    for name, value in (("steps", args.steps), ("batch_size", args.batch_size)):
        if value is not None:
            common[name] = value
    if args.experiment == "regression":
        result = experiments.regression_experiment(**common)
    elif args.experiment == "dynamics":
        result = experiments.dynamics_experiment(**common, **({"models": args.models} if args.models else {}))
    else:
        result = experiments.plateau_experiment(
            **common, **({"strategies": args.strategies} if args.strategies else {}),
            warmup_steps_fixed=args.warmup_steps_fixed, mix_fraction=args.mix_fraction, weights_loss=args.weights_loss)
    args.out.mkdir(parents=True, exist_ok=True)
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"arguments": arguments, "environment": environment(), **result}
    (args.out / f"{args.experiment}.json").write_text(json.dumps(result, indent=1) + "\n")
    table = experiments.summary(result)
    (args.out / f"{args.experiment}.md").write_text(table)
    if not args.no_plot:
        experiments.plot(result, args.out / f"{args.experiment}.png")
    print(table)
    print(f"wrote {args.out / args.experiment}.json / .md" + ("" if args.no_plot else " / .png"))
    return 0
