"""Perplexity with in-context adaptation: the TinT paper's language-modelling protocol.

The corpus is tokenised, concatenated and cut into blocks of ``block_size`` tokens. In every block the first
``floor(train_fraction * block_size)`` tokens form the training part; the reported perplexity is

    exp( sum_{blocks} sum_{t: x_{t+1} not in training part} -log p(x_{t+1} | x_{<=t})  /  #evaluation targets )

so the model as is (``icl``: the training part is only context), dynamic evaluation (an SGD step on the training part
first) and TinT are scored on exactly the same tokens. A block seed cuts the text at its own random offset and draws
its blocks at random (:func:`text_blocks`); :func:`summarize_perplexity` reports each method's grid over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..assets import sample_speeches
from ..simulate import build_target_masks, next_token_nll
from .fewshot import at_grid_edge
from .modes import Batch, check_fits
from .scoring import Mode


def text_blocks(tokenizer: PreTrainedTokenizerBase, text: str, block_size: int,
                max_blocks: int | None = None, seed: int | None = None) -> torch.Tensor:
    """(N, block_size) token blocks of ``text``.

    ``seed=None``: cut from the first token, keep the first ``max_blocks`` (all by default). ``seed=s``: cut from a
    random offset in [0, block_size) and draw ``max_blocks`` of the blocks at random without replacement (all, in a
    random order, by default), both from ``torch.Generator().manual_seed(s)``: each seed sees other block boundaries.
    The remainder is dropped."""
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be >= 2.")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    if generator is not None:
        ids = ids[int(torch.randint(block_size, (), generator=generator)):]
    total = ids.numel() // block_size
    if total < 1:
        raise ValueError(f"The text has {ids.numel()} tokens, fewer than one block of {block_size}; use a smaller "
                         f"--block-size or a longer corpus.")
    blocks = ids[: total * block_size].view(total, block_size)
    n = total if max_blocks is None else min(max_blocks, total)
    if generator is None:
        return blocks[:n]
    return blocks[torch.randperm(total, generator=generator)[:n]]


def address_split(tokenizer: PreTrainedTokenizerBase, held_out: str, block_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Split the shipped State of the Union sample by address: blocks of the addresses whose heading starts with
    ``held_out`` (e.g. ``"1964"``) are held out, the others train. Each address is cut into ``block_size`` blocks on
    its own (no block spans two addresses). Returns (train (N, block_size), held-out (M, block_size), train
    headings, held-out headings)."""
    speeches = sample_speeches()
    held = [name for name in speeches if name.startswith(held_out)]
    if not held or len(held) == len(speeches):
        raise ValueError(f"held-out address prefix {held_out!r} must match some but not all of the shipped "
                         f"addresses {list(speeches)}; e.g. '1964'.")
    kept = [name for name in speeches if name not in held]
    blocks = {name: text_blocks(tokenizer, text, block_size) for name, text in speeches.items()}
    return torch.cat([blocks[n] for n in kept]), torch.cat([blocks[n] for n in held]), kept, held


def train_mask_for(blocks: torch.Tensor, train_fraction: float) -> torch.Tensor:
    """(N, L) mask with 1 on the first ``floor(train_fraction * L)`` tokens of each block."""
    if not 0 <= train_fraction < 1:
        raise ValueError(f"train_fraction={train_fraction} must be in [0, 1) (some tokens must be evaluated).")
    mask = torch.zeros_like(blocks)
    mask[:, : int(train_fraction * blocks.shape[1])] = 1
    return mask


def block_perplexity(mode: Mode, blocks: torch.Tensor, train_fraction: float, *, batch_size: int = 4,
                     desc: str = "perplexity", progress: bool = True) -> dict:
    """Evaluation-part NLL and perplexity of ``blocks`` under ``mode``: dict with nll, tokens, perplexity."""
    check_fits(mode, blocks.shape[1], "use a block size <= the model's positions (--block-size)")
    train = train_mask_for(blocks, train_fraction)
    total_nll, total_tokens = 0.0, 0
    for first in tqdm(range(0, len(blocks), batch_size), desc=desc, unit="batch", disable=not progress):
        ids, mask = blocks[first:first + batch_size], train[first:first + batch_size]
        batch = Batch(ids, torch.ones_like(ids), mask, torch.ones_like(ids))
        evaluated = build_target_masks(ids, None, mask).eval
        nll = next_token_nll(mode.logits(batch).double(), ids)
        total_nll += (nll * evaluated).sum().item()
        total_tokens += int(evaluated.sum())
    return dict(nll=total_nll, tokens=total_tokens, perplexity=math.exp(total_nll / total_tokens))


def summarize_perplexity(records: Sequence[dict]) -> list[dict]:
    """One row per (train fraction, mode, lr) of ``records`` (dicts with mode, lr, train_fraction, seed, perplexity):
    the mean and standard deviation over seeds, the mean change against ``icl`` on the same seeds, and for each
    adaptive mode the lr with the lowest mean perplexity on the scored blocks (``best``), flagged ``at_edge`` when it
    is the smallest or largest lr of that mode's grid (the optimum may lie outside it)."""
    icl = {(r["train_fraction"], r["seed"]): r["perplexity"] for r in records if r["mode"] == "icl"}
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["train_fraction"], r["mode"], r["lr"]), []).append(r)
    rows = []
    for (fraction, mode, lr), group in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0.0)):
        values = [r["perplexity"] for r in group]
        changes = [r["perplexity"] - icl[fraction, r["seed"]] for r in group if (fraction, r["seed"]) in icl]
        rows.append(dict(train_fraction=fraction, mode=mode, lr=lr, seeds=len(values), mean=statistics.fmean(values),
                         std=statistics.stdev(values) if len(values) > 1 else 0.0,
                         change=statistics.fmean(changes) if len(changes) == len(values) else None))
    for fraction, mode in {(r["train_fraction"], r["mode"]) for r in rows if r["mode"] != "icl"}:
        grid = [r for r in rows if (r["train_fraction"], r["mode"]) == (fraction, mode)]
        best = min(grid, key=lambda r: r["mean"])
        best["best"] = True
        best["at_edge"] = at_grid_edge(best["lr"], [r["lr"] for r in grid])
    return rows


def perplexity_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`summarize_perplexity`'s rows; the chosen lr of each adaptive mode in bold."""
    lines = ["| train fraction | mode | lr | seeds | perplexity (mean ± std) | change vs icl |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mark = "**" if r.get("best") else ""
        edge = " (grid edge)" if r.get("at_edge") else ""
        change = "" if r["change"] is None or r["mode"] == "icl" else f"{r['change']:+.3f}"
        lines.append(f"| {r['train_fraction']} | {r['mode']} | {mark}{r['lr'] if r['lr'] is not None else '-'}{mark}"
                     f"{edge} | {r['seeds']} | {r['mean']:.3f} ± {r['std']:.3f} | {change} |")
    return "\n".join(lines) + "\n"
