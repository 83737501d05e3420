"""Cost of the reference simulations relative to one plain forward pass, measured in the same run.

    python bench/simulate.py                     # OPT-125M shapes, random weights, T=256 and 1024, CPU
    python bench/simulate.py --device cuda --seq-lens 256 1024 2048

Prints, per sequence length: plain forward time, ``tint_step`` / forward and ``exact_step`` / forward
(target: tint_step <= 4 forward passes).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from common import median_time, opt_125m_config
from transformers import OPTForCausalLM

from tint_hf.simulate import exact_step, tint_step


@torch.no_grad()
def plain_forward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = OPTForCausalLM(opt_125m_config()).to(args.device).eval()
    print(f"OPT-125M shapes, random weights, fp32, device={args.device}, B={args.batch_size}, "
          f"threads={torch.get_num_threads()}")
    print(f"{'T':>6} {'forward s':>10} {'tint_step/fwd':>14} {'exact_step/fwd':>15}")
    for T in args.seq_lens:
        ids = torch.randint(0, model.config.vocab_size, (args.batch_size, T), device=args.device)
        train = torch.zeros_like(ids)
        train[:, : T // 2] = 1

        t_fwd = median_time(partial(plain_forward, model, ids), args.device, args.repeats)
        t_tint = median_time(partial(tint_step, model, ids, None, train, lr=args.lr), args.device, args.repeats)
        t_exact = median_time(partial(exact_step, model, ids, None, train, lr=args.lr), args.device, args.repeats)
        print(f"{T:>6} {t_fwd:>10.3f} {t_tint / t_fwd:>14.2f} {t_exact / t_fwd:>15.2f}", flush=True)


if __name__ == "__main__":
    main()
