"""``tint-hf eval``: few-shot classification in the icl / dynamic / tint modes, with result files.

Example (offline, local data in the ``DATA_DIR/<Task>/{train,test}.jsonl`` layout)::

    tint-hf eval --model facebook/opt-125m --tasks SST2,MR --data-dir data --modes icl,dynamic \\
        --shots 0,32 --seeds 1,2,3 --lrs 1e-4,1e-5 --calibration icl_sfc --out runs/opt125m
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from .._optional import require
from ..evaluation import FewShotConfig, FewShotEvaluator, ModeConfig, get_task, load_examples, summarize_runs
from ..evaluation.fewshot import MODES
from ..evaluation.report import markdown_table, write_results
from ..evaluation.scoring import CALIBRATIONS
from ..simulate import Approximations

HELP = "Few-shot evaluation (standard ICL, dynamic evaluation, TinT) with one scorer; writes JSON/JSONL/MD/PNG."
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, TinT and adaptation options shared by ``eval`` and ``ppl``."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="Causal LM: a local folder or a Hub id (any HF causal LM).")
    group.add_argument("--tokenizer", default=None, help="Tokenizer folder or id (default: --model).")
    group.add_argument("--gguf-file", default=None, help="GGUF file inside --model (dequantised; needs `gguf`).")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    group.add_argument("--tint-model", default=None,
                       help="TinT checkpoint for the tint mode (`tint-hf build`); default: built here from --model.")
    group.add_argument("--num-prefixes", type=int, default=None,
                       help="P when building TinT here (default: the divisor of d nearest d / 3).")
    adapt = parser.add_argument_group("adaptation (dynamic / tint)")
    adapt.add_argument("--modes", type=_names, default=("icl",), help=f"Comma-separated subset of {MODES}.")
    adapt.add_argument("--lrs", type=_floats, default=(1e-4,),
                       help="Learning rate(s) of the step on the SUMMED loss; several -> chosen on the dev subset.")
    adapt.add_argument("--n-steps", type=int, default=1, help="SGD steps (default 1).")
    adapt.add_argument("--n-layers", type=int, default=None, help="Update the top N decoder layers (default: all).")
    adapt.add_argument("--tint-approximations", action="store_true",
                       help="dynamic mode: TinT's approximate step (tint_step) instead of true SGD.")
    adapt.add_argument("--batch-size", type=int, default=8)
    adapt.add_argument("--quiet", action="store_true", help="No progress bars.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--tasks", type=_names, required=True, help="Comma-separated task names (e.g. SST2,MR,AGNews).")
    data.add_argument("--data-dir", type=Path, default=None, help="Folder with <Task>/train.jsonl and <Task>/test.jsonl.")
    data.add_argument("--train-file", type=Path, default=None, help="Demonstration pool file (one task only).")
    data.add_argument("--eval-file", type=Path, default=None, help="Evaluation pool file (one task only).")
    data.add_argument("--hub", action="store_true", help="Load from the HF Hub (needs internet).")
    data.add_argument("--text-field", default=None)
    data.add_argument("--label-field", default="label")
    proto = parser.add_argument_group("protocol")
    proto.add_argument("--shots", type=_ints, default=(0, 32), help="Numbers of demonstrations (default 0,32).")
    proto.add_argument("--seeds", type=_ints, default=(1, 2, 3), help="Demonstration seeds (default 1,2,3).")
    proto.add_argument("--template", type=int, default=0, help="Template id (0 = the TinT paper's).")
    proto.add_argument("--calibration", choices=CALIBRATIONS, default="none")
    proto.add_argument("--n-eval", type=int, default=200, help="Balanced test subset size (default 200).")
    proto.add_argument("--n-dev", type=int, default=100, help="Disjoint dev subset for choosing --lrs (default 100).")
    proto.add_argument("--eval-seed", type=int, default=0)
    proto.add_argument("--unbalanced", action="store_true", help="Do not class-balance demonstrations and subsets.")
    proto.add_argument("--legacy-sampler", action="store_true",
                       help="NumPy RandomState permutations (the TinT authors' exact demonstrations).")
    proto.add_argument("--loss", choices=["context", "label"], default="context",
                       help="Adaptation loss: every training token, or the demonstrations' label words only.")
    proto.add_argument("--variant", choices=["concatenated", "single"], default="concatenated",
                       help="dynamic and tint: demos in one sequence (then ICL), or each demo its own sequence and "
                            "one summed step (then zero-shot; tint packs them as separate segments).")
    proto.add_argument("--train-on-query", action="store_true",
                       help="The query is part of the training part too (the paper's transductive setting).")
    proto.add_argument("--bos", choices=["auto", "always", "never"], default="auto",
                       help="Prepend BOS: follow the tokenizer (auto), or force.")
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    parser.add_argument("--no-plot", action="store_true", help="Skip accuracy.png (needs tint_hf[plot]).")


def load_model(args: argparse.Namespace) -> tuple[nn.Module, object]:
    """The causal LM (eval mode) and its tokenizer (pad token set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype], **gguf).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, **({} if args.tokenizer else gguf))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_tint(args: argparse.Namespace, model: nn.Module) -> nn.Module | None:
    """The TinT model for the tint mode (None if the mode is not requested)."""
    from ..models.tint import TinTForCausalLM

    if "tint" not in args.modes:
        return None
    if args.tint_model:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.tint_model, dtype=DTYPES[args.dtype]).eval()
    return TinTForCausalLM.from_auxiliary(model, num_prefixes=args.num_prefixes,
                                          n_simulation_layers=args.n_layers, n_steps=args.n_steps, progress=True)


def mode_configs(args: argparse.Namespace) -> list[ModeConfig]:
    approx = Approximations() if args.tint_approximations else None
    return [ModeConfig(mode, lrs=args.lrs, n_steps=args.n_steps, n_layers=args.n_layers, loss=args.loss,
                       variant=args.variant if mode in ("dynamic", "tint") else "concatenated",
                       approximations=approx if mode == "dynamic" else None, train_on_query=args.train_on_query)
            for mode in args.modes]


def run(args: argparse.Namespace) -> int:
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes {unknown}: choose from {MODES}.")
    if (args.train_file or args.eval_file) and len(args.tasks) != 1:
        raise SystemExit("--train-file/--eval-file describe one task; pass a single --tasks name or use --data-dir.")
    tasks = [get_task(name) for name in args.tasks]
    if not args.no_plot:
        require("matplotlib", "plot", "tint-hf eval's accuracy.png (or pass --no-plot)")
    model, tokenizer = load_model(args)
    config = FewShotConfig(shots=args.shots, seeds=args.seeds, template=args.template, calibration=args.calibration,
                           n_eval=args.n_eval, n_dev=args.n_dev, eval_seed=args.eval_seed,
                           balanced=not args.unbalanced, legacy_sampler=args.legacy_sampler,
                           batch_size=args.batch_size, add_bos={"auto": None, "always": True, "never": False}[args.bos],
                           progress=not args.quiet)
    evaluator = FewShotEvaluator(model, tokenizer, config, load_tint(args, model))
    modes = mode_configs(args)
    runs, predictions = [], []
    for task in tasks:
        source = dict(data_dir=args.data_dir, hub=args.hub, text_field=args.text_field, label_field=args.label_field)
        train = load_examples(task, "train", file=args.train_file, **source)
        evaluation = load_examples(task, "eval", file=args.eval_file, **source)
        result = evaluator.evaluate_task(task, train, evaluation, modes)
        runs += result.runs
        predictions += result.predictions
    summary = summarize_runs(runs, {t.name: t.num_classes for t in tasks})
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    out = write_results(args.out, arguments, runs, predictions, summary, plot=not args.no_plot)
    print(markdown_table(summary))
    print(f"results: {out}/results.json, predictions.jsonl, summary.md" + ("" if args.no_plot else ", accuracy.png"))
    return 0
