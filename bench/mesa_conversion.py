"""Converting layers of a real pretrained model to mesa layers (tint_hf.conversion), with controls.

    python bench/mesa_conversion.py --model assets/smollm2-135m --layers 26,27,28,29 --solvers cg gd exact \
        --seeds 0 --transfer-steps 40 --finetune-steps 30 --out bench/mesa_conversion

Text: the shipped State of the Union sample (chronological); its last 20% (the later years) is held out. For each
solver and seed, the held-out perplexity after each stage (init, calibrate, transfer, finetune), and the control of
the same layers' attention output set to zero in the original model; per-position NLL of the original, the zeroed
control and each final model (does the converted model use context beyond 64 tokens?). Writes results.json and
results.md under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tint_hf.assets import sample_text  # noqa: E402
from tint_hf.conversion import ConversionSettings, convert, decoder_layers  # noqa: E402
from tint_hf.evaluation import text_blocks  # noqa: E402


@torch.no_grad()
def nll_by_position(model, blocks: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(T - 1,) mean next-token NLL at each position over ``blocks`` (N, T)."""
    total = torch.zeros(blocks.shape[1] - 1, dtype=torch.float64)
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        logits = model(batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.mT, batch[:, 1:], reduction="none").double().sum(0)
    return total / len(blocks)


def zeroed_attention(model, layers):
    """Forward hooks that set the chosen layers' attention output to zero (the removed-attention control)."""
    return [decoder_layers(model)[i].self_attn.register_forward_hook(
        lambda module, args, output: (torch.zeros_like(output[0]),) + tuple(output[1:])) for i in layers]


def bands(nll: torch.Tensor) -> dict:
    """Mean NLL over position bands 1-16, 17-64, 65-128, 129-end."""
    edges = [(0, 16), (16, 64), (64, 128), (128, len(nll))]
    return {f"{lo + 1}-{hi}": float(nll[lo:hi].mean()) for lo, hi in edges if hi > lo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--layers", required=True)
    parser.add_argument("--solvers", nargs="+", default=["cg", "gd", "exact"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--transfer-steps", type=int, default=40)
    parser.add_argument("--finetune-steps", type=int, default=30)
    parser.add_argument("--cg-steps", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/mesa_conversion"))
    args = parser.parse_args()

    layers = [int(x) for x in args.layers.split(",")]
    teacher = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    blocks = text_blocks(tokenizer, sample_text(), args.block_size)
    held = max(args.eval_blocks, len(blocks) // 5)
    train, evaluation = blocks[:-held], blocks[-held:][: args.eval_blocks]
    result = {"arguments": {k: str(v) for k, v in vars(args).items()}, "train_blocks": len(train),
              "eval_blocks": len(evaluation), "runs": []}
    teacher_nll = nll_by_position(teacher, evaluation, args.batch_size)
    handles = zeroed_attention(teacher, layers)
    zero_nll = nll_by_position(teacher, evaluation, args.batch_size)
    for handle in handles:
        handle.remove()
    result["teacher"] = {"perplexity": float(teacher_nll.mean().exp()), "bands": bands(teacher_nll)}
    result["zeroed_attention"] = {"perplexity": float(zero_nll.mean().exp()), "bands": bands(zero_nll)}
    print(f"teacher {result['teacher']['perplexity']:.3f}  zeroed {result['zeroed_attention']['perplexity']:.3f}")
    for solver in args.solvers:
        for seed in args.seeds:
            settings = ConversionSettings(mesa_layers=layers, mesa=dict(mesa_solver=solver, cg_steps=args.cg_steps),
                                          transfer_steps=args.transfer_steps, finetune_steps=args.finetune_steps,
                                          batch_size=args.batch_size, seed=seed)
            start = time.perf_counter()
            student = convert(teacher, train, args.out / f"{solver}-seed{seed}", settings, eval_blocks=evaluation)
            seconds = time.perf_counter() - start
            record = json.loads((args.out / f"{solver}-seed{seed}" / "stages.json").read_text())
            final_nll = nll_by_position(student, evaluation, args.batch_size)
            run = {"solver": solver, "seed": seed, "seconds": seconds,
                   "perplexity": {stage: facts["perplexity"] for stage, facts in record["stages"].items()},
                   "bands": bands(final_nll)}
            result["runs"].append(run)
            print(solver, seed, {k: round(v, 3) for k, v in run["perplexity"].items()}, f"{seconds:.0f} s")
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| model | init | calibrate | transfer | finetune | NLL 1-16 | 17-64 | 65-128 | 129-end | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("teacher", "zeroed_attention"):
        ppl, b = result[name]["perplexity"], result[name]["bands"]
        lines.append(f"| {name} | {ppl:.2f} | | | | " + " | ".join(f"{v:.3f}" for v in b.values()) + " | |")
    for run in result["runs"]:
        p = run["perplexity"]
        lines.append(f"| mesa {run['solver']} seed {run['seed']} | " + " | ".join(
            f"{p.get(s, float('nan')):.2f}" for s in ("init", "calibrate", "transfer", "finetune")) + " | "
            + " | ".join(f"{v:.3f}" for v in run["bands"].values()) + f" | {run['seconds'] / 60:.1f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
