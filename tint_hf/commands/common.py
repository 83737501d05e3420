"""What several ``tint-hf`` subcommands share: the model / TinT / adaptation options of ``eval`` and ``ppl``, the
protocol defaults and presets (declared once here, shown by ``--help``), and the loaders of models and tokenizers.

Each subcommand module holds only its own command (``HELP``, ``add_arguments``, ``run``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ..evaluation.fewshot import MODES, TintSource, steps_for_layers
from ..runstore import RunStore, fingerprint_model, fingerprint_tokenizer, versions
from .arguments import at_least, choices, comma_list, learning_rate_or_zero, positive, shown

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
PAPER_TASKS = ("SST2", "MR", "CR", "MPQA", "Subj", "AGNews", "AmazonPolarity", "YelpPolarity")
# Arguments a preset may set; their parser default is None and DEFAULTS fills what neither the user nor a preset gave.
DEFAULTS = dict(modes=("icl",), lrs=(1e-4,), label_lrs=None, layers=None, num_steps=None, loss=("context",),
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
NOT_SETTINGS = ("out", "quiet", "no_plot", "overwrite", "func", "batch_size", "tint_memory_gib")


def preset_default(name: str, text: str) -> str:
    """Help of a preset-able option: ``text`` and the default from :data:`DEFAULTS` (what applies without
    ``--preset``; the parser's own default is None, so that a preset can tell it was not given)."""
    default = DEFAULTS[name]
    return f"{text} (default: {shown(default) if default not in (None, ()) else 'none'}; eval's --preset may set it)"


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every preset-able argument the user did not give: from ``--preset`` if set, else from DEFAULTS."""
    preset = PRESETS.get(getattr(args, "preset", None) or "", {})
    for name, default in DEFAULTS.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, preset.get(name, default))
    return args


def layer_grid(args: argparse.Namespace) -> list[tuple[int | None, int]]:
    """(top layers updated, steps) per grid point: ``--layers`` with ``--num-steps``, or 12 / L steps as in the paper
    (one step when all layers are updated; :func:`~tint_hf.evaluation.fewshot.steps_for_layers`)."""
    grid = []
    for layers in args.layers or (None,):
        try:
            grid.append((layers, steps_for_layers(layers, args.num_steps)))
        except ValueError as error:
            raise SystemExit(f"--layers {layers}: {error}; pass --num-steps.") from None
    return grid


def add_loading_arguments(parser: argparse.ArgumentParser, model_help: str) -> argparse._ArgumentGroup:
    """The options of :func:`load_model` (--model, --tokenizer, --gguf-file, --dtype), in a "model" group."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help=model_help)
    group.add_argument("--tokenizer", default=None, help="Tokenizer folder or id (default: --model).")
    group.add_argument("--gguf-file", default=None, help="GGUF file inside --model (dequantised; needs `gguf`).")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return group


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, TinT and adaptation options shared by ``eval`` and ``ppl``."""
    group = add_loading_arguments(parser, "Causal LM: a local folder or a Hub id (any HF causal LM).")
    group.add_argument("--tint-model", default=None,
                       help="TinT checkpoint for the tint mode (`tint-hf build`); default: built here from --model "
                            "for every --layers value.")
    group.add_argument("--num-prefixes", type=at_least(1), default=None,
                       help="P when building TinT here (default: the divisor of d nearest d / 3).")
    adapt = parser.add_argument_group("adaptation (dynamic / tint)")
    adapt.add_argument("--modes", type=choices(MODES), default=None,
                       help=preset_default("modes", f"Comma-separated subset of {MODES}."))
    adapt.add_argument("--lrs", type=comma_list(learning_rate_or_zero, unique=True), default=None,
                       help=preset_default("lrs", "Learning rate(s) of the step on the SUMMED loss; several -> chosen "
                                                  "per seed (--select)."))
    adapt.add_argument("--layers", type=comma_list(at_least(1), unique=True), default=None,
                       help="Update the top L decoder layers, one grid point per value, e.g. 3,6,12 (default: all; "
                            "eval's --preset may set it).")
    adapt.add_argument("--num-steps", type=at_least(1), default=None,
                       help="SGD steps (default: 12 / L for --layers L, as in the paper; 1 for all layers).")
    adapt.add_argument("--tint-approximations", action="store_true",
                       help="dynamic mode: TinT's approximate step (tint_step) instead of true SGD.")
    adapt.add_argument("--batch-size", type=at_least(1), default=8)
    adapt.add_argument("--tint-memory-gib", type=positive, default=None,
                       help="Memory for the tint mode's per-row steps (rows that train on their own tokens); a batch "
                            "is split into calls that fit, with the same results (default: half the free memory).")
    adapt.add_argument("--quiet", action="store_true", help="No progress bars.")


def tint_memory_budget(args: argparse.Namespace) -> int | None:
    """``--tint-memory-gib`` in bytes (None: the tint mode's default, half the free memory)."""
    return None if args.tint_memory_gib is None else int(args.tint_memory_gib * 2**30)


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
    ``(num_layers, num_steps) -> TinTForCausalLM`` that constructs TinT from ``model`` for each grid point."""
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

    def build(num_layers: int | None, num_steps: int) -> nn.Module:
        return TinTForCausalLM.from_auxiliary(model, num_prefixes=args.num_prefixes, num_simulation_layers=num_layers,
                                              num_steps=num_steps, progress=not args.quiet)
    return build


def settings_of(args: argparse.Namespace) -> dict:
    """Every argument that can change a result, JSON-ready."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}


def refuse_ignored(args: argparse.Namespace, given: set[str]) -> None:
    """Options the user gave (``given``: their names) that this call would not use are refused, with the reason.
    Shared by ``eval`` and ``ppl`` (the options of :func:`add_model_arguments`; the rest only where they exist)."""
    loss = getattr(args, "loss", ("context",))
    unused = {
        "tint_model": ("tint" not in args.modes, "applies to the tint mode only"),
        "num_prefixes": ("tint" not in args.modes or args.tint_model is not None,
                         "sets P when TinT is built here (tint mode, no --tint-model)"),
        "tint_memory_gib": ("tint" not in args.modes, "applies to the tint mode only"),
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


def open_store(args: argparse.Namespace, records: str, result_files: tuple[str, ...],
               free: tuple[str, ...]) -> RunStore:
    """The run store in ``--out`` (:mod:`tint_hf.runstore`): resumed and extended when the settings other than
    ``free`` (the arguments that only choose which cells run) match and the package versions are the same, emptied
    with ``--overwrite``, refused otherwise."""
    store = RunStore(args.out, records, overwrite=args.overwrite, also_remove=result_files,
                     fresh_start="pass --overwrite to discard it, or use another --out")
    store.check_settings(settings_of(args), free=free)
    store.check_provenance("versions", versions())
    if store.records:
        print(f"resuming {args.out}: {len(store.records)} finished cells are read back, not recomputed")
    return store


def check_loaded(store: RunStore, model: nn.Module, tokenizer, tint: TintSource | None) -> None:
    """Refuse a resume whose model, tokenizer or TinT checkpoint (content hashes) differ from the store's."""
    store.check_provenance("model", fingerprint_model(model))
    store.check_provenance("tokenizer", fingerprint_tokenizer(tokenizer))
    if isinstance(tint, nn.Module):
        store.check_provenance("tint_model", fingerprint_model(tint))
