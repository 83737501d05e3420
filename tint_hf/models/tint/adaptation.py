"""The auxiliary weights after TinT's simulated step, and the bookkeeping of per-row updates.

A step updates the prefixes of the simulated layers; rows that train on identical data share one update (R = 1 or
U groups), rows with their own training data get their own (R = B), kept as factors over the shared prefixes
(:mod:`.prefix_updates`) while those are the smaller form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prefix_updates import Prefix, add_update, rows_of, select_rows, tensors_of
from .sequence_masks import TargetMasks


@dataclass
class TinTAdaptation:
    """The auxiliary weights after the simulated step(s), as they sit in the prefixes of the updated layers.

    ``prefixes``: one dict per simulated (top) layer, prefix slot -> (R, P, D); ``final_prefix``: (R, P, D), where
    R = 1 (one update shared by every row) or the batch size (one update per row; a slot is then a
    :class:`~.prefix_updates.FactoredPrefix` when its factors are smaller than the dense prefixes).
    :meth:`TinTModel.adapt` returns it; ``forward(..., adaptation=...)`` then predicts with these weights and skips
    the step, so one set of demonstrations is trained on once and any number of later batches reuse it.
    """

    prefixes: list[dict[str, Prefix]]
    final_prefix: Prefix
    origin: tuple = ()  # TinTModel.origin() of the model that made it, checked when it is used

    def slots(self) -> list[Prefix]:
        return [self.final_prefix, *(p for layer in self.prefixes for p in layer.values())]

    @property
    def rows(self) -> int:
        return max(rows_of(p) for p in self.slots())

    def select(self, rows: torch.Tensor) -> TinTAdaptation:
        """The updates of the given rows (B',) in that order (repeats allowed), e.g. one per request of a batch whose
        requests share the training parts adapted on, or each row's group of a step; a shared update (R = 1) stays
        shared, and all rows in order return this adaptation itself (no copy)."""
        if rows.shape[0] == self.rows and torch.equal(rows, torch.arange(self.rows, device=rows.device)):
            return self
        return TinTAdaptation([{slot: select_rows(p, rows) for slot, p in layer.items()} for layer in self.prefixes],
                              select_rows(self.final_prefix, rows), self.origin)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it holds, each once (prefixes and factors)."""
        seen: dict[int, torch.Tensor] = {}
        for prefix in self.slots():
            seen.update((id(t), t) for t in tensors_of(prefix))
        return list(seen.values())


def check_adaptation(input_ids: torch.Tensor, adaptation: TinTAdaptation, train_mask: torch.Tensor | None,
                       loss_mask: torch.Tensor | None, inner_lr, origin: tuple) -> torch.Tensor:
    """Check a call that predicts with a given ``adaptation`` (no step of its own); its all-zero train_mask.
    ``origin``: :meth:`TinTModel.origin` of the model called."""
    if not isinstance(adaptation, TinTAdaptation):
        raise TypeError(f"adaptation must be a TinTAdaptation (from model.adapt(...)), got {type(adaptation).__name__}.")
    if adaptation.rows not in (1, input_ids.shape[0]):
        raise ValueError(f"adaptation holds {adaptation.rows} updates, but the batch has {input_ids.shape[0]} rows: "
                         "adapt on one sequence (shared by every row) or on as many rows as the batch.")
    for name, value in (("loss_mask", loss_mask), ("inner_lr", inner_lr)):
        if value is not None:
            raise ValueError(f"{name} has no effect with adaptation= (the step has already been taken): pass it "
                             "to adapt(...) instead.")
    if train_mask is not None and bool(train_mask.bool().any()):
        raise ValueError("train_mask marks training tokens, but adaptation= skips the step: train with "
                         "adapt(...) first, or drop adaptation to take the step in this pass.")
    if adaptation.origin != origin:
        raise ValueError("This adaptation was made by another TinT model, or by this one before its weights, "
                         "dtype, device or simulated layers changed: its prefixes would be read as the wrong "
                         "weights. Call adapt(...) on this model (after the change) and pass that.")
    return torch.zeros_like(input_ids)


def distinct_rows(input_ids: torch.Tensor, masks: TargetMasks, span: int,
                   lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One representative row per group of rows identical on their first ``span`` positions (tokens, masks,
    positions, segments) and in their step size ``lr`` (B, 1), and each row's group index: (U,), (B,)."""
    parts = [input_ids[:, :span], masks.attention_mask[:, :span].long(), masks.train_tokens[:, :span].long(),
             masks.train[:, : span - 1].long(), masks.position_ids[:, :span], lr.view(torch.int64)]
    if masks.segment_ids is not None:
        parts.append(masks.segment_ids[:, :span])
    key = torch.cat(parts, dim=1)
    _, group = torch.unique(key, dim=0, return_inverse=True)
    every = torch.arange(key.shape[0], device=key.device)
    if int(group.max()) + 1 == key.shape[0]:  # all rows differ: run them in order (no copy of per-row prefixes)
        return every, every
    rows = torch.zeros(int(group.max()) + 1, dtype=torch.long, device=key.device)
    rows.scatter_(0, group, every)
    return rows, group


def added_update(base: TinTAdaptation, new: TinTAdaptation, start: TinTAdaptation) -> TinTAdaptation:
    """``base + (new - start)``: the update of ``new`` (taken from the weights ``start``) added to ``base``. A
    per-row update of ``new`` kept as factors over ``start`` stays factored (over ``base``'s weights)."""
    return TinTAdaptation([{slot: add_update(b[slot], n[slot], w[slot]) for slot in n}
                           for b, n, w in zip(base.prefixes, new.prefixes, start.prefixes, strict=True)],
                          add_update(base.final_prefix, new.final_prefix, start.final_prefix), new.origin)


__all__ = ["TinTAdaptation", "added_update", "check_adaptation", "distinct_rows"]
