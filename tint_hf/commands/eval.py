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
from ..evaluation.fewshot import MODES, SELECTIONS, TintSource
from ..evaluation.report import markdown_table, write_results
from ..evaluation.scoring import CALIBRATIONS
from ..runstore import RunStore, fingerprint_json, fingerprint_model, fingerprint_tokenizer, versions
from ..simulate import Approximations
from .arguments import at_least, comma_list, learning_rate_or_zero

HELP = "Few-shot evaluation (standard ICL, dynamic evaluation, TinT) with one scorer; writes JSON/JSONL/MD/PNG."
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
PAPER_TASKS = ("SST2", "MR", "CR", "MPQA", "Subj", "AGNews", "AmazonPolarity", "YelpPolarity")
LAYER_STEP_BUDGET = 12  # the paper: L top layers get 12 / L steps (L = 12, 6, 3)

# Arguments a preset may set; their parser default is None and DEFAULTS fills what neither the user nor a preset gave.
DEFAULTS = dict(modes=("icl",), lrs=(1e-4,), label_lrs=None, layers=None, n_steps=None, loss=("context",),
                variant=("concatenated",), train_on_query=(), tasks=None, shots=(0, 32), seeds=(1, 2, 3),
                template=0, calibration="none", n_eval=200, n_dev=100, select="dev", legacy_sampler=False)
PRESETS = {
    # Panigrahi et al. (2023), icl_eval: 0 and 32 shots, seeds 1-3, 200 test examples, icl_sfc, the authors'
    # demonstrations, L in {3, 6, 12} top layers with 12 / L steps, single- and multi-FT, both losses with their lr
    # grids; TinT's context loss on the whole prompt, query included (constructed_model_forward trains on every token
    # before the option), dynamic evaluation on the demonstrations only (dynamic_eval_icl); dev- and test-selected
    # learning rates.
    "tint-paper": dict(modes=("icl", "dynamic", "tint"), tasks=PAPER_TASKS, shots=(0, 32), seeds=(1, 2, 3),
                       n_eval=200, n_dev=100, calibration="icl_sfc", template=0, legacy_sampler=True,
                       layers=(12, 6, 3), loss=("context", "label"), lrs=(1e-5, 1e-6, 1e-7),
                       label_lrs=(1e-3, 1e-4, 1e-5), variant=("single", "concatenated"), train_on_query=("tint",),
                       select="both"),
}
# Settings that cannot change a result: a resumed run may differ in these.
NOT_SETTINGS = ("out", "quiet", "no_plot", "overwrite", "func", "batch_size")
RESULT_FILES = ("results.json", "predictions.jsonl", "summary.md", "accuracy.png", "settings.json")
# Arguments that only choose which cells run: each cell's key names its task, mode label (variant, loss, layers,
# steps, approximations), shots and seed, so a later call in the same --out may choose other cells (add a task or a
# mode, or fill in a column) while the cells already there stay valid. Everything else must match.
CELL_SELECTION = ("tasks", "modes", "shots", "seeds", "layers", "n_steps", "loss", "variant", "tint_approximations",
                  "train_on_query", "preset")


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = _names(text)
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated subset of {', '.join(allowed)}")
        return names
    return parse


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every preset-able argument the user did not give: from ``--preset`` if set, else from DEFAULTS."""
    preset = PRESETS.get(getattr(args, "preset", None) or "", {})
    for name, default in DEFAULTS.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, preset.get(name, default))
    return args


def layer_grid(args: argparse.Namespace) -> list[tuple[int | None, int]]:
    """(top layers updated, steps) per grid point: ``--layers`` with ``--n-steps``, or 12 / L steps as in the paper
    (one step when all layers are updated)."""
    grid = []
    for layers in args.layers or (None,):
        if args.n_steps is not None:
            steps = args.n_steps
        elif layers is None:
            steps = 1
        elif layers >= 1 and LAYER_STEP_BUDGET % layers == 0:
            steps = LAYER_STEP_BUDGET // layers
        else:
            raise SystemExit(f"--layers {layers}: the paper's budget of {LAYER_STEP_BUDGET} layer-steps gives no "
                             f"whole number of steps; pass --n-steps.")
        grid.append((layers, steps))
    return grid


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, TinT and adaptation options shared by ``eval`` and ``ppl``."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="Causal LM: a local folder or a Hub id (any HF causal LM).")
    group.add_argument("--tokenizer", default=None, help="Tokenizer folder or id (default: --model).")
    group.add_argument("--gguf-file", default=None, help="GGUF file inside --model (dequantised; needs `gguf`).")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    group.add_argument("--tint-model", default=None,
                       help="TinT checkpoint for the tint mode (`tint-hf build`); default: built here from --model "
                            "for every --layers value.")
    group.add_argument("--num-prefixes", type=at_least(1), default=None,
                       help="P when building TinT here (default: the divisor of d nearest d / 3).")
    adapt = parser.add_argument_group("adaptation (dynamic / tint)")
    adapt.add_argument("--modes", type=_choices(MODES), default=None, help=f"Comma-separated subset of {MODES}.")
    adapt.add_argument("--lrs", type=comma_list(learning_rate_or_zero, unique=True), default=None,
                       help="Learning rate(s) of the step on the SUMMED loss (default 1e-4); several -> chosen per "
                            "seed (--select).")
    adapt.add_argument("--layers", type=comma_list(at_least(1), unique=True), default=None,
                       help="Update the top L decoder layers, one grid point per value, e.g. 3,6,12 (default: all).")
    adapt.add_argument("--n-steps", type=at_least(1), default=None,
                       help="SGD steps (default: 12 / L for --layers L, as in the paper; 1 for all layers).")
    adapt.add_argument("--tint-approximations", action="store_true",
                       help="dynamic mode: TinT's approximate step (tint_step) instead of true SGD.")
    adapt.add_argument("--batch-size", type=at_least(1), default=8)
    adapt.add_argument("--quiet", action="store_true", help="No progress bars.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="tint-paper: the TinT paper's whole protocol and grid (see README); explicit arguments "
                             "override it.")
    add_model_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--tasks", type=_names, default=None, help="Comma-separated task names (e.g. SST2,MR,AGNews).")
    data.add_argument("--data-dir", type=Path, default=None, help="Folder with <Task>/train.jsonl and <Task>/test.jsonl.")
    data.add_argument("--train-file", type=Path, default=None, help="Demonstration pool file (one task only).")
    data.add_argument("--eval-file", type=Path, default=None, help="Evaluation pool file (one task only).")
    data.add_argument("--hub", action="store_true", help="Load from the HF Hub (needs internet).")
    data.add_argument("--text-field", default=None)
    data.add_argument("--label-field", default="label")
    proto = parser.add_argument_group("protocol")
    proto.add_argument("--shots", type=comma_list(at_least(0), unique=True), default=None, help="Numbers of demonstrations (default 0,32).")
    proto.add_argument("--seeds", type=comma_list(at_least(0), unique=True), default=None, help="Demonstration seeds (default 1,2,3).")
    proto.add_argument("--template", type=at_least(0), default=None, help="Template id (default 0 = the TinT paper's).")
    proto.add_argument("--calibration", choices=CALIBRATIONS, default=None, help="Default: none.")
    proto.add_argument("--n-eval", type=at_least(1), default=None, help="Balanced test subset size (default 200).")
    proto.add_argument("--n-dev", type=at_least(1), default=None,
                       help="Disjoint dev subset for choosing --lrs (default 100).")
    proto.add_argument("--select", choices=SELECTIONS, default=None,
                       help="Choose each seed's learning rate on the dev subset (default, ours), on the test subset "
                            "itself (the authors' scripts: an oracle number), or report both rows.")
    proto.add_argument("--eval-seed", type=at_least(0), default=0)
    proto.add_argument("--unbalanced", action="store_true", help="Do not class-balance demonstrations and subsets.")
    proto.add_argument("--legacy-sampler", action="store_true", default=None,
                       help="NumPy RandomState permutations (the TinT authors' exact demonstrations and subsets).")
    proto.add_argument("--loss", type=_choices(("context", "label")), default=None,
                       help="Adaptation loss(es): every training token (context), the demonstrations' label words "
                            "only (label), or both as grid points: context,label.")
    proto.add_argument("--label-lrs", type=comma_list(learning_rate_or_zero, unique=True), default=None,
                       help="Learning rates of the label loss (default: --lrs).")
    proto.add_argument("--variant", type=_choices(("concatenated", "single")), default=None,
                       help="dynamic and tint: demos in one sequence, then ICL (concatenated, multi-FT), or each demo "
                            "its own sequence and one summed step, then zero-shot (single-FT; tint packs them as "
                            "separate segments); both: single,concatenated.")
    proto.add_argument("--train-on-query", type=_choices(("dynamic", "tint", "none")), nargs="?",
                       const=("dynamic", "tint"), default=None,
                       help="Modes whose context loss also trains on the query (both variants, and at k = 0): tint "
                            "is the TinT authors' protocol (--preset tint-paper), dynamic the matched comparison, "
                            "none neither (TinT without the query, under the preset); the flag alone means both. "
                            "Default: none.")
    proto.add_argument("--bos", choices=["auto", "always", "never"], default="auto",
                       help="Prepend BOS: follow the tokenizer (auto), or force.")
    parser.add_argument("--out", type=Path, required=True,
                        help="Output folder. A run stopped early resumes from it (same settings); finished cells "
                             "are not recomputed.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Discard a previous run with other settings in --out instead of refusing.")
    parser.add_argument("--no-plot", action="store_true", help="Skip accuracy.png (needs tint_hf[plot]).")


def loaded(option: str, name: str, load, **kwargs):
    """``load(name, **kwargs)``, with a failure on a name that is no local folder reported as such (transformers
    would say "Repo id must be in the form ..." or try the network)."""
    try:
        return load(name, **kwargs)
    except Exception as error:
        if Path(name).exists():
            raise
        raise FileNotFoundError(f"{option} {name}: no such local folder, and it did not load as a Hub id "
                                f"({type(error).__name__}: {str(error)[:200]}). Give a folder with config.json "
                                "(e.g. written by save_pretrained) or a Hub id on a machine with internet.") from None


def load_model(args: argparse.Namespace) -> tuple[nn.Module, object]:
    """The causal LM (eval mode) and its tokenizer (pad token set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = loaded("--model", args.model, AutoModelForCausalLM.from_pretrained, dtype=DTYPES[args.dtype], **gguf).eval()
    tokenizer = loaded("--tokenizer" if args.tokenizer else "--model", args.tokenizer or args.model,
                       AutoTokenizer.from_pretrained, **({} if args.tokenizer else gguf))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_tint(args: argparse.Namespace, model: nn.Module) -> TintSource | None:
    """What the tint mode runs (None if it is not requested): the ``--tint-model`` checkpoint, or a builder
    ``(n_layers, n_steps) -> TinTForCausalLM`` that constructs TinT from ``model`` for each grid point."""
    from ..models.tint import TinTForCausalLM

    if "tint" not in args.modes:
        return None
    if args.tint_model:
        from transformers import AutoModelForCausalLM

        tint = loaded("--tint-model", args.tint_model, AutoModelForCausalLM.from_pretrained,
                      dtype=DTYPES[args.dtype]).eval()
        if not isinstance(tint, TinTForCausalLM):
            raise ValueError(f"--tint-model {args.tint_model} holds a {type(tint).__name__}, not a TinT checkpoint; "
                             f"build one from --model with `tint-hf build --aux {args.model} --out DIR`, or drop "
                             "--tint-model to build it here.")
        return tint

    def build(n_layers: int | None, n_steps: int) -> nn.Module:
        return TinTForCausalLM.from_auxiliary(model, num_prefixes=args.num_prefixes, n_simulation_layers=n_layers,
                                              n_steps=n_steps, progress=not args.quiet)
    return build


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
        for n_layers, n_steps in layer_grid(args):
            for variant in args.variant:
                for loss in args.loss:
                    configs.append(ModeConfig(
                        mode, lrs=args.label_lrs if loss == "label" and args.label_lrs else args.lrs,
                        n_steps=n_steps, n_layers=n_layers, loss=loss, variant=variant,
                        approximations=approx if mode == "dynamic" else None,
                        train_on_query=mode in args.train_on_query and loss == "context"))
    if "none" in args.train_on_query and len(args.train_on_query) > 1:
        raise SystemExit(f"--train-on-query {','.join(args.train_on_query)}: 'none' goes alone.")
    return configs


def settings_of(args: argparse.Namespace) -> dict:
    """Every argument that can change a result, JSON-ready."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}


def open_store(args: argparse.Namespace) -> RunStore:
    """The run store in ``--out`` (:mod:`tint_hf.runstore`): resumed and extended when the settings other than
    :data:`CELL_SELECTION` match (and, checked as they are loaded, the model, tokenizer, data and package versions),
    emptied with ``--overwrite``, refused otherwise."""
    store = RunStore(args.out, "cells.jsonl", overwrite=args.overwrite, also_remove=RESULT_FILES,
                     fresh_start="pass --overwrite to discard it, or use another --out")
    store.check_settings(settings_of(args), free=CELL_SELECTION)
    store.check_provenance("versions", versions())
    if store.records:
        print(f"resuming {args.out}: {len(store.records)} finished cells are read back, not recomputed")
    return store


def refuse_ignored(args: argparse.Namespace, given: set[str]) -> None:
    """Options the user gave (``given``: their names) that this call would not use are refused, with the reason.
    Shared by ``eval`` and ``ppl`` (the options of :func:`add_model_arguments`; the rest only where they exist)."""
    loss = getattr(args, "loss", ("context",))
    unused = {
        "tint_model": ("tint" not in args.modes, "applies to the tint mode only"),
        "num_prefixes": ("tint" not in args.modes or args.tint_model is not None,
                         "sets P when TinT is built here (tint mode, no --tint-model)"),
        "tint_approximations": ("dynamic" not in args.modes, "applies to the dynamic mode only"),
        "label_lrs": ("label" not in loss, "applies to the label loss only (--loss label)"),
        "train_on_query": (not set(getattr(args, "train_on_query", ())) - {"none"} <= set(args.modes)
                           or "context" not in loss, "names adaptive modes that run with the context loss"),
    }
    for name, (ignored, reason) in unused.items():
        if name in given and ignored:
            raise SystemExit(f"--{name.replace('_', '-')} would be ignored in this call: it {reason}.")


def given_options(args: argparse.Namespace) -> set[str]:
    """Names of the options the user gave (before :func:`resolve_defaults` fills the others)."""
    return {name for name, value in vars(args).items() if value not in (None, False)}


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
    store = open_store(args)
    model, tokenizer = load_model(args)
    store.check_provenance("model", fingerprint_model(model))
    store.check_provenance("tokenizer", fingerprint_tokenizer(tokenizer))
    tint = load_tint(args, model)
    if isinstance(tint, nn.Module):
        store.check_provenance("tint_model", fingerprint_model(tint))
    config = FewShotConfig(shots=args.shots, seeds=args.seeds, template=args.template, calibration=args.calibration,
                           n_eval=args.n_eval, n_dev=args.n_dev, eval_seed=args.eval_seed,
                           balanced=not args.unbalanced, legacy_sampler=args.legacy_sampler,
                           batch_size=args.batch_size, add_bos={"auto": None, "always": True, "never": False}[args.bos],
                           progress=not args.quiet, select=args.select)
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
