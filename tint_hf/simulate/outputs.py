"""Output container of the one-step simulations."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .masks import TargetMasks


@dataclass
class SimulationOutput(ModelOutput):
    """Result of one (or ``num_steps``) internal SGD step(s).

    Args:
        loss_before / loss_after: token-weighted mean NLL over all evaluation targets of the batch (NaN if none).
        logits_before / logits_after: (B, T, V) logits of the original and of the updated model.
        eval_nll_before / eval_nll_after: (B,) summed NLL over each sequence's evaluation targets.
        eval_tokens: (B,) number of evaluation targets per sequence.
        params: updated parameters (HF names, leading batch dimension B), when requested.
    """

    loss_before: torch.Tensor | None = None
    loss_after: torch.Tensor | None = None
    logits_before: torch.Tensor | None = None
    logits_after: torch.Tensor | None = None
    eval_nll_before: torch.Tensor | None = None
    eval_nll_after: torch.Tensor | None = None
    eval_tokens: torch.Tensor | None = None
    params: dict[str, torch.Tensor] | None = None


def summarize(logits_before: torch.Tensor, logits_after: torch.Tensor, input_ids: torch.Tensor, masks: TargetMasks,
              params: dict[str, torch.Tensor] | None) -> SimulationOutput:
    """Evaluation-part losses of both logits tensors, packed into a :class:`SimulationOutput`."""
    b, t = masks.eval.nonzero(as_tuple=True)  # only evaluation targets are scored (the full softmax is costly)
    targets = input_ids[b, t + 1]
    batch = input_ids.shape[0]

    def per_sequence(logits: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(logits[b, t].float() if logits.dtype in (torch.float16, torch.bfloat16)
                              else logits[b, t], targets, reduction="none")
        return torch.zeros(batch, dtype=nll.dtype, device=nll.device).index_add_(0, b, nll)

    tokens = masks.eval.sum(-1)
    eval_before, eval_after = per_sequence(logits_before), per_sequence(logits_after)
    total = tokens.sum()
    return SimulationOutput(
        loss_before=eval_before.sum() / total,
        loss_after=eval_after.sum() / total,
        logits_before=logits_before,
        logits_after=logits_after,
        eval_nll_before=eval_before,
        eval_nll_after=eval_after,
        eval_tokens=tokens,
        params=params,
    )
