"""Helpers shared by the benchmark scripts: timing with warm-up and medians, OPT-125M-shaped configs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers import OPTConfig


def opt_125m_config(**overrides) -> OPTConfig:
    """facebook/opt-125m's shapes (d=768, 12 layers, 12 heads, d_ff=3072, vocab 50272, 2048 positions)."""
    kwargs = dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                  max_position_embeddings=2048, word_embed_proj_dim=768, dropout=0.0, attention_dropout=0.0,
                  do_layer_norm_before=True)
    kwargs.update(overrides)
    return OPTConfig(**kwargs)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: torch.device | str, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
