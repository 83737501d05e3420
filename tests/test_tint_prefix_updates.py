"""Per-row updates kept as factors (tint_hf/models/tint/prefix_updates.py): the same weights as the dense update,
written with plain matrices as the reference, and far less memory per row."""

from __future__ import annotations

import pytest
import torch
from test_tint import batch, build, rel

from tint_hf.models.tint.prefix_updates import FactoredPrefix
from tint_hf.models.tint.simulated_modules import (
    TinTLinearBackwardDescent,
    TinTLinearForward,
    prefix_bias,
    prefix_weight,
    stack_into_prefixes,
)

D_MODEL, P, G, B, N, T = 16, 4, 3, 2, 5, 7


def random_slot(gen: torch.Generator):
    """G dense d x d maps (W, b) in the prefix layout (1, G, P, D)."""
    weight = torch.randn(G, D_MODEL, D_MODEL, generator=gen, dtype=torch.float64)
    bias = torch.randn(G, D_MODEL, generator=gen, dtype=torch.float64)
    return weight, bias, stack_into_prefixes(weight, bias, P).unsqueeze(0)


def test_factored_slot_applies_the_updated_weights():
    """W' = W - L^T X - diag(g), b' = b - c, applied without forming W' (forward and backward heads), and written
    out by dense(): each against the plain matrices, float64."""
    gen = torch.Generator().manual_seed(0)
    weight, bias, base = random_slot(gen)
    left, right = (torch.randn(B, G, N, D_MODEL, generator=gen, dtype=torch.float64) for _ in range(2))
    diag, shift = (torch.randn(B, G, D_MODEL, generator=gen, dtype=torch.float64) for _ in range(2))
    slot = FactoredPrefix(base, left, right, diag, shift)
    updated_w = weight - left.transpose(-1, -2) @ right - torch.diag_embed(diag)      # (B, G, d, d)
    updated_b = bias - shift                                                            # (B, G, d)
    x, dy = (torch.randn(B, G, T, D_MODEL, generator=gen, dtype=torch.float64) for _ in range(2))

    y = TinTLinearForward(D_MODEL, P)(x, slot)
    assert rel(y, x @ updated_w.transpose(-1, -2) + updated_b.unsqueeze(-2)) < 1e-13
    dx, _ = TinTLinearBackwardDescent(D_MODEL, P)(dy, x, slot, torch.zeros(B, T, dtype=torch.float64))
    assert rel(dx, dy @ updated_w) < 1e-13
    dense = slot.dense()
    assert dense.shape == (B, G, P, base.shape[-1])
    assert rel(prefix_weight(dense, D_MODEL), updated_w) < 1e-13
    assert rel(prefix_bias(dense, D_MODEL), updated_b) < 1e-13


def test_descent_heads_return_the_sgd_step_as_factors():
    """The descent heads' update, written out, is W - sum_t lr_t dy_t x_t^T and b - sum_t lr_t dy_t (plain
    matrices); positions with lr 0 are not kept as factors."""
    gen = torch.Generator().manual_seed(1)
    weight, bias, base = random_slot(gen)
    x, dy = (torch.randn(B, G, T, D_MODEL, generator=gen, dtype=torch.float64) for _ in range(2))
    lr = torch.rand(B, T, generator=gen, dtype=torch.float64)
    lr[:, -2:] = 0                                                                      # not in the training part
    _, new = TinTLinearBackwardDescent(D_MODEL, P)(dy, x, base, lr)
    assert isinstance(new, FactoredPrefix) and new.left.shape[-2] == T - 2
    scaled = dy * lr[:, None, :, None]
    assert rel(prefix_weight(new.dense(), D_MODEL), weight - scaled.transpose(-1, -2) @ x) < 1e-13
    assert rel(prefix_bias(new.dense(), D_MODEL), bias - scaled.sum(-2)) < 1e-13


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_per_row_updates_are_factored_and_predict_as_the_dense_ones(family):
    """Rows that train on their own tokens keep their update as factors (2 N d numbers per slot, not a copy of the
    prefixes), and predict exactly as with the same update written out densely (float64, 1e-12)."""
    _, tint = build(family)
    ids, attn, train = batch(B=3, T=8, train=5)
    adaptation = tint.adapt(ids, attn, train)
    factored_slots = [p for layer in adaptation.prefixes for p in layer.values() if isinstance(p, FactoredPrefix)]
    assert adaptation.rows == 3 and len(factored_slots) >= 5  # ln1, ln2, v, o and the MLP slots of each layer
    for slot in factored_slots:
        assert slot.base.shape[0] == 1 and slot.factor_numel() < slot.base[0].numel()
    dense = type(adaptation)([{s: p.dense() if isinstance(p, FactoredPrefix) else p for s, p in layer.items()}
                              for layer in adaptation.prefixes],
                             adaptation.final_prefix.dense() if isinstance(adaptation.final_prefix, FactoredPrefix)
                             else adaptation.final_prefix, adaptation.origin)
    queries = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(2))
    with_factors = tint(queries, adaptation=adaptation).logits
    assert rel(with_factors, tint(queries, adaptation=dense).logits) < 1e-12


def test_the_memory_estimate_per_row_is_what_the_step_keeps():
    """update_bytes_per_row(tokens), part of what the evaluation splits batches by, counts what a per-row adaptation
    really holds per row (factors, or dense copies where those are smaller), within the norms' vectors."""
    _, tint = build("opt")
    for tokens in (4, 12):  # factors, and (d = 32: 2 N d > the slot's P D for most slots) dense copies
        ids = torch.randint(3, 64, (3, tokens), generator=torch.Generator().manual_seed(tokens))
        adaptation = tint.adapt(ids)
        held = sum(p.factor_numel() if isinstance(p, FactoredPrefix) else p[0].numel()
                   for p in adaptation.slots() if isinstance(p, FactoredPrefix) or p.shape[0] == 3)
        estimate = tint.update_bytes_per_row(tokens) // 8
        assert held <= estimate <= held + 4 * 32 * tint.config.num_simulation_layers + 64
    assert tint.update_bytes_per_row(None) >= tint.update_bytes_per_row(12) > tint.update_bytes_per_row(4)
