"""``tint-hf eval``: few-shot classification in the icl / dynamic / tint modes, with result files.

Example (offline, local data in the ``DATA_DIR/<Task>/{train,test}.jsonl`` layout)::

    tint-hf eval --model facebook/opt-125m --tasks SST2,MR --data-dir data --modes icl,dynamic \\
        --shots 0,32 --seeds 1,2,3 --lrs 1e-4,1e-5 --calibration icl_sfc --out runs/opt125m
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .._optional import require
from ..evaluation import FewShotConfig, FewShotEvaluator, ModeConfig, get_task, load_examples, summarize_runs
from ..evaluation.fewshot import SELECTIONS
from ..evaluation.report import markdown_table, write_results
from ..evaluation.scoring import CALIBRATIONS
from ..runstore import fingerprint_json
from ..simulate import Approximations
from .arguments import at_least, choices, comma_list, learning_rate_or_zero, names
from .common import (
    PRESETS,
    add_model_arguments,
    check_loaded,
    given_options,
    layer_grid,
    load_model,
    load_tint,
    open_store,
    preset_default,
    refuse_ignored,
    resolve_defaults,
    settings_of,
    tint_memory_budget,
)

HELP = "Few-shot evaluation (standard ICL, dynamic evaluation, TinT) with one scorer; writes JSON/JSONL/MD/PNG."
RESULT_FILES = ("results.json", "predictions.jsonl", "summary.md", "accuracy.png", "settings.json")
# Arguments that only choose which cells run: each cell's key names its task, mode label (variant, loss, layers,
# steps, approximations), shots and seed, so a later call in the same --out may choose other cells (add a task or a
# mode, or fill in a column) while the cells already there stay valid. Everything else must match.
CELL_SELECTION = ("tasks", "modes", "shots", "seeds", "layers", "num_steps", "loss", "variant", "tint_approximations",
                  "train_on_query", "preset")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="tint-paper: the TinT paper's whole protocol and grid (see README); explicit arguments "
                             "override it.")
    add_model_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--tasks", type=names, default=None, help=preset_default("tasks", "Comma-separated task names (e.g. SST2,MR,AGNews)."))
    data.add_argument("--data-dir", type=Path, default=None, help="Folder with <Task>/train.jsonl and <Task>/test.jsonl.")
    data.add_argument("--train-file", type=Path, default=None, help="Demonstration pool file (one task only).")
    data.add_argument("--eval-file", type=Path, default=None, help="Evaluation pool file (one task only).")
    data.add_argument("--hub", action="store_true", help="Load from the HF Hub (needs internet).")
    data.add_argument("--text-field", default=None)
    data.add_argument("--label-field", default="label")
    proto = parser.add_argument_group("protocol")
    proto.add_argument("--shots", type=comma_list(at_least(0), unique=True), default=None, help=preset_default("shots", "Numbers of demonstrations."))
    proto.add_argument("--seeds", type=comma_list(at_least(0), unique=True), default=None, help=preset_default("seeds", "Demonstration seeds."))
    proto.add_argument("--template", type=at_least(0), default=None, help=preset_default("template", "Template id (0 = the TinT paper's)."))
    proto.add_argument("--calibration", choices=CALIBRATIONS, default=None,
                       help=preset_default("calibration", "Calibration of the label scores."))
    proto.add_argument("--n-eval", type=at_least(1), default=None, help=preset_default("n_eval", "Balanced test subset size."))
    proto.add_argument("--n-dev", type=at_least(1), default=None,
                       help=preset_default("n_dev", "Disjoint dev subset for choosing --lrs."))
    proto.add_argument("--select", choices=SELECTIONS, default=None,
                       help=preset_default("select", "Choose each seed's learning rate on the dev subset (ours), on "
                                                     "the test subset itself (the authors' scripts: an oracle number), "
                                                     "or report both rows."))
    proto.add_argument("--eval-seed", type=at_least(0), default=0)
    proto.add_argument("--unbalanced", action="store_true", help="Do not class-balance demonstrations and subsets.")
    proto.add_argument("--legacy-sampler", action="store_true", default=None,
                       help=preset_default("legacy_sampler", "NumPy RandomState permutations (the TinT authors' exact "
                                                             "demonstrations and subsets)."))
    proto.add_argument("--loss", type=choices(("context", "label")), default=None,
                       help=preset_default("loss", "Adaptation loss(es): every training token (context), the "
                                                   "demonstrations' label words only (label), or both as grid points: "
                                                   "context,label."))
    proto.add_argument("--label-lrs", type=comma_list(learning_rate_or_zero, unique=True), default=None,
                       help="Learning rates of the label loss (default: --lrs).")
    proto.add_argument("--variant", type=choices(("concatenated", "single")), default=None,
                       help=preset_default("variant", "dynamic and tint: demos in one sequence, then ICL "
                                                      "(concatenated, multi-FT), or each demo its own sequence and one "
                                                      "summed step, then zero-shot (single-FT; tint packs them as "
                                                      "separate segments); both: single,concatenated."))
    proto.add_argument("--train-on-query", type=choices(("dynamic", "tint", "none")), nargs="?",
                       const=("dynamic", "tint"), default=None,
                       help=preset_default("train_on_query", "Modes whose context loss also trains on the query "
                                                             "(both variants, and at k = 0): tint is the TinT authors' "
                                                             "protocol (--preset tint-paper), dynamic the matched "
                                                             "comparison, none neither (TinT without the query, under "
                                                             "the preset); the flag alone means both."))
    proto.add_argument("--bos", choices=["auto", "always", "never"], default="auto",
                       help="Prepend BOS: follow the tokenizer (auto), or force.")
    parser.add_argument("--out", type=Path, required=True,
                        help="Output folder. A run stopped early resumes from it (same settings); finished cells "
                             "are not recomputed.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Discard a previous run with other settings in --out instead of refusing.")
    parser.add_argument("--no-plot", action="store_true", help="Skip accuracy.png (needs tint_hf[plot]).")


def mode_configs(args: argparse.Namespace) -> list[ModeConfig]:
    """icl once, then per adaptive mode the grid: layers (outermost, so TinT is built once per value) x variant x
    loss. ``--train-on-query`` applies to the modes it names, with the context loss (the label loss trains on the
    demonstrations' label words only, as the authors' gradient_mask does)."""
    approx = Approximations() if args.tint_approximations else None
    configs = []
    for mode in args.modes:
        if mode == "icl":
            configs.append(ModeConfig("icl"))
            continue
        for num_layers, num_steps in layer_grid(args):
            for variant in args.variant:
                for loss in args.loss:
                    configs.append(ModeConfig(
                        mode, lrs=args.label_lrs if loss == "label" and args.label_lrs else args.lrs,
                        num_steps=num_steps, num_layers=num_layers, loss=loss, variant=variant,
                        approximations=approx if mode == "dynamic" else None,
                        train_on_query=mode in args.train_on_query and loss == "context"))
    if "none" in args.train_on_query and len(args.train_on_query) > 1:
        raise SystemExit(f"--train-on-query {','.join(args.train_on_query)}: 'none' goes alone.")
    return configs


def run(args: argparse.Namespace) -> int:
    given = given_options(args)
    resolve_defaults(args)
    refuse_ignored(args, given)
    if not args.tasks:
        raise SystemExit("Pass --tasks (e.g. --tasks SST2,MR) or a --preset.")
    if (args.train_file or args.eval_file) and len(args.tasks) != 1:
        raise SystemExit("--train-file/--eval-file describe one task; pass a single --tasks name or use --data-dir.")
    tasks = [get_task(name) for name in args.tasks]
    modes = mode_configs(args)
    if not args.no_plot:
        require("matplotlib", "plot", "tint-hf eval's accuracy.png (or pass --no-plot)")
    store = open_store(args, "cells.jsonl", RESULT_FILES, CELL_SELECTION)
    model, tokenizer = load_model(args)
    tint = load_tint(args, model)
    check_loaded(store, model, tokenizer, tint)
    config = FewShotConfig(shots=args.shots, seeds=args.seeds, template=args.template, calibration=args.calibration,
                           n_eval=args.n_eval, n_dev=args.n_dev, eval_seed=args.eval_seed,
                           balanced=not args.unbalanced, legacy_sampler=args.legacy_sampler,
                           batch_size=args.batch_size, add_bos={"auto": None, "always": True, "never": False}[args.bos],
                           progress=not args.quiet, select=args.select,
                           tint_memory_budget=tint_memory_budget(args))
    evaluator = FewShotEvaluator(model, tokenizer, config, tint, store=store)
    runs, predictions = [], []
    for task in tasks:
        source = dict(data_dir=args.data_dir, hub=args.hub, text_field=args.text_field, label_field=args.label_field)
        train = load_examples(task, "train", file=args.train_file, **source)
        evaluation = load_examples(task, "eval", file=args.eval_file, **source)
        store.check_provenance(f"data/{task.name}", fingerprint_json(
            [[[e.text, e.label] for e in pool] for pool in (train, evaluation)]))
        result = evaluator.evaluate_task(task, train, evaluation, modes)
        runs += result.runs
        predictions += result.predictions
    summary = summarize_runs(runs, {t.name: t.num_classes for t in tasks})
    out = write_results(args.out, settings_of(args), runs, predictions, summary, plot=not args.no_plot)
    print(markdown_table(summary))
    print(f"results: {out}/results.json, predictions.jsonl, summary.md" + ("" if args.no_plot else ", accuracy.png"))
    return 0
