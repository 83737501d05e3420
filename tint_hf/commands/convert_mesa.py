"""``tint-hf convert-mesa``: turn an OPT or Llama-family model into a (hybrid) mesa model (:mod:`tint_hf.conversion`).

Stages (each saved to ``<out>/<stage>``, resumable): init, calibrate, transfer (attention transfer), finetune
(LoRA + KL to the original). Text: ``--text-file`` (default: the shipped State of the Union sample), cut into blocks;
the last ``--eval-fraction`` of it (the later years of the sample) is held out for the perplexity of each stage.
``--held-out-address 1964`` instead trains on the shipped addresses of the other years and scores that one (the split
of ``bench/mesa_conversion.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..assets import sample_text
from ..conversion import LORA_TARGETS, STAGES, ConversionSettings
from ..models.mesa import MesaOPTConfig
from ..models.mesa.mesa_op import SOLVERS
from .arguments import at_least, choices, field_default, fraction, learning_rate, non_negative
from .common import add_loading_arguments, load_model

HELP = "Convert chosen layers of an OPT / Llama-family model to mesa layers: calibrate, attention transfer, LoRA + KL."


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated layer indices, got {text!r}.") from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_loading_arguments(parser, "OPT or Llama-family causal LM: a local folder or a Hub id.")
    parser.add_argument("--layers", type=_layers, required=True, help="Decoder layers to convert, e.g. 26,27,28,29.")
    parser.add_argument("--solver", choices=SOLVERS, default=field_default(MesaOPTConfig, "mesa_solver"),
                        help="mesa_solver (gd: linear attention).")
    parser.add_argument("--cg-steps", type=at_least(1), default=field_default(MesaOPTConfig, "cg_steps"))
    parser.add_argument("--short-conv-size", type=at_least(0), default=field_default(MesaOPTConfig, "short_conv_size"), help="MesaNet's short convolution width (0: off).")
    parser.add_argument("--output-gate", action="store_true", help="MesaNet's SiLU output gate.")
    parser.add_argument("--window", type=at_least(0), default=field_default(MesaOPTConfig, "mesa_window"),
                        help="Softmax over the last W tokens inside each converted layer, the mesa layer over the "
                             "older ones (LoLCATs-style hybrid; 0: mesa only).")
    parser.add_argument("--window-only", action="store_true",
                        help="The window-only control: softmax over the last --window tokens, no mesa part.")
    def default(name: str):
        return field_default(ConversionSettings, name)

    parser.add_argument("--stages", type=choices(STAGES), default=default("stages"),
                        help=f"Comma-separated stages after the initialisation, in the order {','.join(STAGES)}.")
    parser.add_argument("--transfer-steps", type=at_least(0), default=default("transfer_steps"))
    parser.add_argument("--transfer-lr", type=learning_rate, default=default("transfer_lr"))
    parser.add_argument("--train-qkv", action="store_true", help="Attention transfer also trains q/k/v.")
    parser.add_argument("--finetune-steps", type=at_least(0), default=default("finetune_steps"))
    parser.add_argument("--finetune-lr", type=learning_rate, default=default("finetune_lr"))
    parser.add_argument("--lora-rank", type=at_least(1), default=default("lora_rank"))
    parser.add_argument("--lora-target", choices=sorted(LORA_TARGETS), default=default("lora_target"),
                        help="Projections of the converted layers that LoRA fine-tunes.")
    parser.add_argument("--kl-weight", type=non_negative, default=default("kl_weight"))
    parser.add_argument("--batch-size", type=at_least(1), default=default("batch_size"))
    parser.add_argument("--block-size", type=at_least(2), default=256)
    parser.add_argument("--text-file", type=Path, default=None, help="UTF-8 training text (default: shipped sample).")
    parser.add_argument("--eval-fraction", type=fraction, default=None,
                        help="Held-out share, taken from the end (default 0.2; not with --held-out-address).")
    parser.add_argument("--held-out-address", default=None,
                        help="Split the shipped sample by address instead: hold out the addresses whose heading "
                             "starts with this (e.g. 1964), train on the others (not with --text-file).")
    parser.add_argument("--seed", type=at_least(0), default=default("seed"))
    parser.add_argument("--out", type=Path, required=True, help="Output folder (one sub-folder per stage).")
    parser.add_argument("--no-plot", action="store_true", help="Skip losses.png (no matplotlib needed).")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")


def run(args: argparse.Namespace) -> int:
    from ..conversion import convert
    from ..evaluation import address_split, text_blocks

    if args.text_file is not None and not args.text_file.is_file():
        raise FileNotFoundError(f"--text-file {args.text_file} does not exist.")
    if args.held_out_address is not None and (args.text_file is not None or args.eval_fraction is not None):
        raise ValueError("--held-out-address splits the shipped sample by address; it does not go with --text-file "
                         "or --eval-fraction (drop one or the other).")
    if not args.no_plot:
        from .._optional import require

        require("matplotlib", "plot", "tint-hf convert-mesa's losses.png (or pass --no-plot)")
    if args.window_only and not args.window:
        raise ValueError("--window-only is the window-only control: give its size with --window W (W > 0).")
    mesa = dict(mesa_solver=args.solver, cg_steps=args.cg_steps, short_conv_size=args.short_conv_size,
                use_output_gate=args.output_gate, mesa_window=args.window, mesa_window_only=args.window_only)
    settings = ConversionSettings(
        mesa_layers=args.layers, mesa=mesa, stages=args.stages,
        transfer_steps=args.transfer_steps, transfer_lr=args.transfer_lr, train_qkv=args.train_qkv,
        finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, lora_rank=args.lora_rank,
        lora_target=args.lora_target, kl_weight=args.kl_weight, batch_size=args.batch_size, seed=args.seed)
    teacher, tokenizer = load_model(args)
    if args.held_out_address is not None:
        try:
            train, held_out, _, _ = address_split(tokenizer, args.held_out_address, args.block_size)
        except ValueError as error:
            raise ValueError(f"--held-out-address: {error}") from error
    else:
        text = args.text_file.read_text(encoding="utf-8") if args.text_file else sample_text()
        blocks = text_blocks(tokenizer, text, args.block_size)
        count = max(1, int(round((args.eval_fraction or 0.2) * len(blocks))))
        if count >= len(blocks):
            raise ValueError(f"The text gives {len(blocks)} blocks of {args.block_size} tokens: too few to hold out "
                             f"{count}; use a longer text or a smaller --block-size.")
        train, held_out = blocks[:-count], blocks[-count:]
    for stage, steps in (("transfer", settings.transfer_steps), ("finetune", settings.finetune_steps)):
        if stage in settings.stages:  # the token budget: steps x batch x block (the blocks repeat by epoch)
            print(f"{stage}: {steps} steps x {settings.batch_size} x {args.block_size} tokens = "
                  f"{steps * settings.batch_size * args.block_size} training tokens "
                  f"({len(train)} distinct blocks = {len(train) * args.block_size} tokens)")
    convert(teacher, train, args.out, settings, eval_blocks=held_out, progress=not args.quiet)
    record = json.loads((args.out / "stages.json").read_text())
    for stage in record["stages"]:  # every stage folder loads with its tokenizer
        tokenizer.save_pretrained(args.out / stage)
    print(f"teacher perplexity {record.get('teacher_perplexity', float('nan')):.3f}")
    for stage, facts in record["stages"].items():
        print(f"{stage:10s} perplexity {facts['perplexity']:.3f}")
    if not args.no_plot:
        plot_losses(record, args.out / "losses.png")
    return 0


def plot_losses(record: dict, path: Path) -> None:
    """Training loss per step of the transfer and finetune stages, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: facts["losses"] for name, facts in record["stages"].items() if "losses" in facts}
    if not curves:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, losses) in zip(axes[0], curves.items(), strict=True):
        ax.plot(range(1, len(losses) + 1), losses)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
