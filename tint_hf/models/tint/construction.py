"""Construction: an auxiliary model's weights written into TinT's embeddings and prefix embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.logging import tqdm

from .auxiliary import AuxiliarySpec, layer_key
from .simulated_modules import LINEAR_SLOTS, NORM_SLOTS, mlp_chunks, mlp_slots, stack_into_prefixes


def load_auxiliary_into(model: nn.Module, spec: AuxiliarySpec, num_prefixes: int,
                        weights: dict[str, torch.Tensor], progress: bool = False) -> None:
    """Write canonical auxiliary weights (see ``auxiliary.py``) into TinT's embeddings and prefix embeddings.

    Every simulated map is d x d: K/V maps of grouped-query attention get zero rows below their d_kv outputs,
    and the MLP is zero-padded to C d hidden units; padded rows stay zero under the simulated step (their
    gradients vanish), so the padding is exact. Missing biases are zero and never updated.
    """
    d, P, chunks = spec.hidden_size, num_prefixes, mlp_chunks(spec)

    def get(name: str, rows: int, cols: int | None = None) -> torch.Tensor:
        """Weight or bias ``name`` zero-padded to ``rows`` (x ``cols``); zeros if the family has no such bias."""
        ref = weights["embed_tokens"]
        if name not in weights:
            return torch.zeros(rows, dtype=ref.dtype, device=ref.device)
        tensor = weights[name]
        pad = [0, (cols or tensor.shape[-1]) - tensor.shape[-1]] if tensor.dim() == 2 else []
        return F.pad(tensor, pad + [0, rows - tensor.shape[0]])

    def norm_prefix(name: str) -> torch.Tensor:
        return stack_into_prefixes(torch.diag(get(f"{name}.weight", d)), get(f"{name}.bias", d), P)

    model.embed_tokens.weight.copy_(weights["embed_tokens"])
    if spec.learned_positions:
        model.embed_positions.weight.copy_(weights["embed_positions"])
    model.final_norm_prefix.copy_(norm_prefix("final_norm"))
    for i, block in enumerate(tqdm(model.layers, desc="Constructing TinT layers", disable=not progress)):
        for slot in NORM_SLOTS:
            block.prefixes[slot].copy_(norm_prefix(layer_key(i, slot)))
        for slot in LINEAR_SLOTS:
            key = layer_key(i, slot)
            block.prefixes[slot].copy_(stack_into_prefixes(get(f"{key}.weight", d), get(f"{key}.bias", d), P))
        for slot in mlp_slots(spec):
            key = layer_key(i, slot)
            if slot == "fc2":   # (d, C d): chunk c is a block of columns; the bias lives in chunk 0
                weight = get(f"{key}.weight", d, chunks * d).unflatten(1, (chunks, d)).transpose(0, 1)
                bias = torch.zeros(chunks, d, dtype=weight.dtype, device=weight.device)
                bias[0] = get(f"{key}.bias", d)
            else:               # (C d, d): chunk c is a block of rows
                weight = get(f"{key}.weight", chunks * d).unflatten(0, (chunks, d))
                bias = get(f"{key}.bias", chunks * d).unflatten(0, (chunks, d))
            block.prefixes[slot].copy_(stack_into_prefixes(weight, bias, P))
