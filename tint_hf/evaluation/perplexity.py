"""Perplexity with in-context adaptation: the TinT paper's language-modelling protocol.

The corpus is tokenised, concatenated and cut into blocks of ``block_size`` tokens. In every block the first
``floor(train_fraction * block_size)`` tokens form the training part; the reported perplexity is

    exp( sum_{blocks} sum_{t: x_{t+1} not in training part} -log p(x_{t+1} | x_{<=t})  /  #evaluation targets )

so the model as is (``icl``: the training part is only context), dynamic evaluation (an SGD step on the training part
first) and TinT are scored on exactly the same tokens.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..assets import sample_speeches
from ..simulate import build_target_masks, next_token_nll
from .modes import Batch, check_fits
from .scoring import Mode


def text_blocks(tokenizer: PreTrainedTokenizerBase, text: str, block_size: int,
                max_blocks: int | None = None) -> torch.Tensor:
    """(N, block_size) token blocks of ``text`` (the remainder is dropped)."""
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be >= 2.")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = ids.numel() // block_size if max_blocks is None else min(max_blocks, ids.numel() // block_size)
    if n < 1:
        raise ValueError(f"The text has {ids.numel()} tokens, fewer than one block of {block_size}; use a smaller "
                         f"--block-size or a longer corpus.")
    return ids[: n * block_size].view(n, block_size)


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
