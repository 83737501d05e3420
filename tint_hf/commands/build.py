"""``tint-hf build``: construct a TinT checkpoint from an auxiliary OPT / GPT-2 / Llama model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..models.tint import TinTConfig, TinTForCausalLM
from .arguments import at_least, field_default, learning_rate, positive
from .common import DTYPES

HELP = "Construct TinTForCausalLM from an auxiliary OPT / GPT-2 / Llama checkpoint and save it (safetensors + remote code)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aux", required=True, help="Auxiliary model: a local folder or a Hub id (e.g. facebook/opt-125m).")
    parser.add_argument("--out", required=True, type=Path, help="Output folder for the TinT checkpoint.")
    parser.add_argument("--num-prefixes", type=at_least(1), default=None,
                        help="P, number of prefix embeddings (default: the divisor of d nearest d / 3, e.g. 256 for "
                             "OPT-125M, 192 for SmolLM2-135M).")
    parser.add_argument("--num-simulation-layers", type=at_least(1), default=None, help="Top layers updated (default: all).")
    def default(name: str):
        return field_default(TinTConfig, name)

    parser.add_argument("--num-steps", type=at_least(1), default=default("num_steps"), help="Simulated SGD steps.")
    parser.add_argument("--inner-lr", type=learning_rate, default=default("inner_lr"),
                        help="Inner learning rate on the summed loss.")
    parser.add_argument("--backward", choices=["fd", "exact"], default=default("backward"),
                        help="LayerNorm/activation backward: TinT's finite difference (fd) or exact.")
    parser.add_argument("--fd-scale", type=positive, default=default("fd_scale"), help="N of the finite difference.")
    parser.add_argument("--loss-gradient", choices=["ce", "quad", "uniform"], default=default("loss_gradient"))
    parser.add_argument("--update-ln-gain", action="store_true", help="Also update LayerNorm gains (default: biases only).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--max-shard-size", default="5GB")


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise SystemExit(f"--out {args.out} is a file; give a folder for the checkpoint.")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out} exists and is not empty; choose a new folder.")
    start = time.perf_counter()
    model = TinTForCausalLM.from_auxiliary(
        args.aux, dtype=DTYPES[args.dtype], progress=True, num_prefixes=args.num_prefixes,
        num_simulation_layers=args.num_simulation_layers, num_steps=args.num_steps, inner_lr=args.inner_lr,
        backward=args.backward, fd_scale=args.fd_scale, loss_gradient=args.loss_gradient,
        ln_bias_only=not args.update_ln_gain)
    built = time.perf_counter() - start
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.aux).save_pretrained(args.out)
    except (OSError, ValueError):
        print(f"note: no tokenizer found at {args.aux}; the checkpoint has none.")
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file()) / 1e9
    print(f"TinT built in {built:.1f} s and saved to {args.out} ({size:.2f} GB on disk)")
    try:
        dense = f"{model.num_parameters(dense_equivalent=True):,}"
    except ValueError as err:  # shapes that the authors' constructor rejects
        dense = f"no count ({err})"
    print(f"parameters stored: {model.num_parameters():,}; the authors' dense construction would have {dense}")
    return 0
