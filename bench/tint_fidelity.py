"""How closely TinT's one forward pass matches (a) the auxiliary model, (b) the reference approximate step
``tint_step`` it simulates, and (c) exact SGD (``exact_step``), in float64 and float32.

    python bench/tint_fidelity.py [--record]      # --record: write tint_hf/data/results/tint_fidelity.json

Random small auxiliary models (OPT with ReLU, GPT-2 with gelu_new, Llama with RMSNorm / SwiGLU (d_ff=344) / RoPE /
2 KV heads; d=128, 4 layers, 4 heads, vocab 512),
T=64, train fraction 0.5, all layers simulated, P=32, inner lr 1e-2 on the summed loss. Figures are relative
L2 errors; "delta" means the change of the logits caused by the step.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import tint_hf
from tint_hf import TinTForCausalLM
from tint_hf.simulate import Approximations, exact_step, select_parameters, tint_step

LR = 1e-2
RECORD = Path(tint_hf.__file__).parent / "data" / "results" / "tint_fidelity.json"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def auxiliary(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "opt":
        config = OPTConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, ffn_dim=512,
                           max_position_embeddings=128, word_embed_proj_dim=128, dropout=0.0, attention_dropout=0.0)
        return OPTForCausalLM(config).eval()
    if family == "gpt2":
        config = GPT2Config(vocab_size=512, n_embd=128, n_layer=4, n_head=4, n_positions=128, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def measure(family: str, dtype: torch.dtype, backward: str) -> dict:
    aux = auxiliary(family).to(dtype)
    tint = TinTForCausalLM.from_auxiliary(aux, num_prefixes=32, inner_lr=LR, backward=backward)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    train = torch.zeros_like(ids)
    train[:, :32] = 1
    out = tint(ids, None, train, return_logits_before=True)
    reference = aux(input_ids=ids).logits
    sim = tint_step(aux, ids, None, train, lr=LR, approximations=Approximations(**tint.config.approximation_kwargs()))
    exact_sub = exact_step(aux, ids, None, train, lr=LR)
    exact_all = exact_step(aux, ids, None, train, lr=LR, params=select_parameters(aux, include_embeddings=True))
    delta = out.logits - out.logits_before
    masks = tint.model.target_masks(ids, None, train, None, None)

    def eval_loss(logits: torch.Tensor) -> float:
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return (nll * masks.eval).sum().item() / masks.eval.sum().item()

    return {
        "first pass vs HF": rel(out.logits_before, reference),
        "delta vs tint_step": rel(delta, sim.logits_after - sim.logits_before),
        "delta vs exact SGD (same subset)": rel(delta, exact_sub.logits_after - exact_sub.logits_before),
        "delta vs exact SGD (all params)": rel(delta, exact_all.logits_after - exact_all.logits_before),
        "eval loss: before / TinT / exact subset / exact all": " / ".join(
            f"{eval_loss(x):.4f}" for x in (out.logits_before, out.logits, exact_sub.logits_after,
                                             exact_all.logits_after)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--record", action="store_true",
                        help=f"also write the table to {RECORD.relative_to(RECORD.parents[3])} (the model cards quote it)")
    args = parser.parse_args()
    print(__doc__.strip().splitlines()[0])
    rows = []
    for family in ("opt", "gpt2", "llama"):
        for dtype in (torch.float64, torch.float32):
            for backward in ("exact", "fd"):
                rows.append(((family, str(dtype).removeprefix("torch."), backward), measure(family, dtype, backward)))
    keys = list(rows[0][1])
    print("| aux | dtype | LN/act backward | " + " | ".join(keys) + " |")
    print("|" + "---|" * (3 + len(keys)))
    for (family, dtype, backward), values in rows:
        cells = [v if isinstance(v, str) else f"{v:.2e}" for v in values.values()]
        print(f"| {family} | {dtype} | {backward} | " + " | ".join(cells) + " |")
    if args.record:
        record = [dict(aux=family, dtype=dtype, backward=backward, **values)
                  for (family, dtype, backward), values in rows]
        RECORD.write_text(json.dumps(dict(command="python bench/tint_fidelity.py --record", date=str(date.today()),
                                          rows=record), indent=1) + "\n")
        print(f"recorded in {RECORD}")


if __name__ == "__main__":
    main()
