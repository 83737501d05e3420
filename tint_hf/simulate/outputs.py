"""Output container of the one-step simulations."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .masks import TargetMasks, next_token_nll


@dataclass
class SimulationOutput(ModelOutput):
    """Result of one (or ``n_steps``) internal SGD step(s).

    Args:
        loss_before / loss_after: token-weighted mean NLL over all evaluation targets of the batch (NaN if none).
        logits_before / logits_after: (B, T, V) logits of the original and of the updated model.
        eval_nll_before / eval_nll_after: (B,) summed NLL over each sequence's evaluation targets.
        eval_tokens: (B,) number of evaluation targets per sequence.
        train_loss_before: (B,) summed training loss that the step descends (before the step).
        params: updated parameters (HF names, leading batch dimension B), when requested.
    """

    loss_before: torch.Tensor | None = None
    loss_after: torch.Tensor | None = None
    logits_before: torch.Tensor | None = None
    logits_after: torch.Tensor | None = None
    eval_nll_before: torch.Tensor | None = None
    eval_nll_after: torch.Tensor | None = None
    eval_tokens: torch.Tensor | None = None
    train_loss_before: torch.Tensor | None = None
    params: dict[str, torch.Tensor] | None = None


def summarize(logits_before: torch.Tensor, logits_after: torch.Tensor, input_ids: torch.Tensor, masks: TargetMasks,
              params: dict[str, torch.Tensor] | None) -> SimulationOutput:
    """Evaluation-part losses of both logits tensors, packed into a :class:`SimulationOutput`."""
    nll_before = next_token_nll(logits_before, input_ids)
    nll_after = next_token_nll(logits_after, input_ids)
    ev = masks.eval.to(nll_before.dtype)
    tokens = ev.sum(-1)
    total = tokens.sum()
    return SimulationOutput(
        loss_before=(nll_before * ev).sum() / total,
        loss_after=(nll_after * ev).sum() / total,
        logits_before=logits_before,
        logits_after=logits_after,
        eval_nll_before=(nll_before * ev).sum(-1),
        eval_nll_after=(nll_after * ev).sum(-1),
        eval_tokens=tokens.long(),
        train_loss_before=(nll_before * masks.train.to(nll_before.dtype)).sum(-1),
        params=params,
    )
