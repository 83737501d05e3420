"""``tint-hf demo``: one step of in-context SGD on an embedded tiny OPT and shipped text, no network needed."""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from ..assets import load_gpt2_tokenizer, sample_text, tiny_demo_model
from ..models.tint import TinTForCausalLM
from ..simulate import Approximations, exact_step, tint_step
from .arguments import at_least, fraction, learning_rate

HELP = ("One step of in-context SGD on a tiny model and shipped text: exact SGD, TinT's approximate SGD (reference) "
        "and the constructed TinT transformer.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="Path or Hub id of an OPT / GPT-2 / Llama causal LM (default: a tiny random OPT built here).")
    parser.add_argument("--seq-len", type=at_least(2), default=256, help="Tokens per block (default: 256).")
    parser.add_argument("--blocks", type=at_least(1), default=4, help="Number of text blocks to evaluate (default: 4).")
    parser.add_argument("--train-fraction", type=fraction, default=0.5,
                        help="Fraction of each block used for the inner step (default: 0.5).")
    parser.add_argument("--lr", type=learning_rate, default=1e-3, help="Inner learning rate on the summed loss.")
    parser.add_argument("--layers", type=at_least(1), default=None, help="Update the top N layers (default: all).")
    parser.add_argument("--num-prefixes", type=at_least(1), default=16, help="TinT prefix embeddings (default: 16).")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    tokenizer = load_gpt2_tokenizer()
    if args.model is None:
        model = tiny_demo_model(len(tokenizer), args.seed)
        print("model: tiny random OPT (2 layers, d=64), GPT-2 BPE vocabulary")
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        print(f"model: {args.model}")
    ids = tokenizer(sample_text(), return_tensors="pt").input_ids[0]
    n_blocks = min(args.blocks, ids.numel() // args.seq_len)
    if n_blocks < 1:
        raise SystemExit(f"--seq-len {args.seq_len} is longer than the shipped text ({ids.numel()} tokens).")
    input_ids = ids[: n_blocks * args.seq_len].view(n_blocks, args.seq_len)
    train_mask = torch.zeros_like(input_ids)
    train_mask[:, : int(args.train_fraction * args.seq_len)] = 1
    print(f"data: {n_blocks} blocks x {args.seq_len} tokens of shipped CC0 text, train fraction {args.train_fraction}")

    start = time.perf_counter()
    exact = exact_step(model, input_ids, None, train_mask, lr=args.lr, num_layers=args.layers)
    t_exact = time.perf_counter() - start
    start = time.perf_counter()
    approx = tint_step(model, input_ids, None, train_mask, lr=args.lr, num_layers=args.layers,
                       approximations=Approximations())
    t_tint = time.perf_counter() - start

    start = time.perf_counter()
    tint = TinTForCausalLM.from_auxiliary(model, num_prefixes=args.num_prefixes, inner_lr=args.lr,
                                          num_simulation_layers=args.layers)
    t_build = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        constructed = tint(input_ids, None, train_mask, labels=input_ids, return_logits_before=True)
    t_forward = time.perf_counter() - start

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    delta_exact = exact.logits_after - exact.logits_before
    delta_approx = approx.logits_after - approx.logits_before
    delta_tint = constructed.logits - constructed.logits_before
    print(f"\neval-part loss (mean NLL per token, lr={args.lr}):")
    print(f"  before the step                    {exact.loss_before.item():.4f}")
    print(f"  after exact SGD (autograd)         {exact.loss_after.item():.4f}   ({t_exact:.2f} s)")
    print(f"  after TinT's approximate SGD       {approx.loss_after.item():.4f}   ({t_tint:.2f} s, reference)")
    print(f"  TinT transformer, one forward pass {constructed.loss.item():.4f}   ({t_forward:.2f} s, "
          f"built in {t_build:.2f} s)")
    print("relative distance of the logit change:")
    print(f"  TinT transformer vs its reference  {distance(delta_tint, delta_approx):.2e}")
    print(f"  TinT transformer vs exact SGD      {distance(delta_tint, delta_exact):.2%}")
    return 0
