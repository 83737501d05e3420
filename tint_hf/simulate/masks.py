"""The sequence convention of the reference steps: which next-token predictions train and which are evaluated.

Written for :mod:`tint_hf.simulate` alone (TinT's model folder states the same convention in its own code; the
tests compare the two):

* ``attention_mask`` (B, T): 1 on real tokens, 0 on padding (either side).
* ``train_mask`` (B, T): 1 on the tokens of the *training part*.
* ``loss_mask`` (B, T), optional: 1 on the tokens that may be training *targets* (e.g. label words only).
* ``segment_ids`` (B, T), optional: several independent sequences packed in one row, numbered in order; no
  prediction crosses from one segment to the next and positions restart in every segment.
* The logits at position t predict token t + 1. The pair (t, t + 1) is a prediction when both tokens are real and
  in one segment; it is a **training target** when token t + 1 is in the training part (and in ``loss_mask``), an
  **evaluation target** when token t + 1 is not in the training part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TargetMasks:
    """``train`` / ``eval`` (B, T-1): training / evaluation targets; ``train_tokens``, ``attention_mask``,
    ``position_ids`` and ``segment_ids`` (B, T): the training-part tokens, real tokens, positions and segments."""

    train: torch.Tensor
    eval: torch.Tensor
    train_tokens: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor | None = None

    def row(self, b: int) -> TargetMasks:
        """The masks of sequence ``b`` alone (a batch of one)."""
        return TargetMasks(*(None if m is None else m[b:b + 1] for m in self._fields()))

    def first(self, length: int) -> TargetMasks:
        """The masks of the first ``length`` positions."""
        return TargetMasks(*(None if m is None else m[:, : length - (1 if i < 2 else 0)]
                             for i, m in enumerate(self._fields())))

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return (self.train, self.eval, self.train_tokens, self.attention_mask, self.position_ids, self.segment_ids)


def _token_flags(name: str, flags, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A (B, T) 0/1 argument as a bool tensor; anything else is refused with the argument's name."""
    flags = torch.as_tensor(flags, device=device)
    if tuple(flags.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have the shape of input_ids {tuple(shape)} (one 0/1 flag per token), got "
                         f"{tuple(flags.shape)}.")
    if flags.dtype != torch.bool and not torch.isin(flags, flags.new_tensor([0, 1])).all():
        raise ValueError(f"`{name}` must hold only 0 and 1, got {sorted(set(flags.flatten().tolist()))[:6]}.")
    return flags.bool()


def default_position_ids(attention_mask: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) long: the number of real tokens before each token in its segment (padding gets a harmless value:
    that of the nearest real token before it, or 0)."""
    real = attention_mask.long()
    upto = real.cumsum(-1)  # real tokens in [0, t]
    if segment_ids is not None:
        starts = F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (1, 0), value=True)
        before_segment = (upto - real).masked_fill(~starts, 0).cummax(-1).values
        upto = upto - before_segment
    return (upto - 1).clamp(min=0)


def build_target_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, train_mask: torch.Tensor | None,
                       loss_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                       segment_ids: torch.Tensor | None = None) -> TargetMasks:
    """Validate the arguments of a step and derive its training and evaluation targets."""
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
    if input_ids.shape[1] < 2:
        raise ValueError("Sequences need at least 2 tokens (one prediction).")
    if train_mask is None:
        raise ValueError("`train_mask` is required: a (batch, seq_len) 0/1 mask with 1 on the tokens of the training "
                         "part (e.g. the first half of each block, or the demonstrations of a prompt).")
    shape, device = input_ids.shape, input_ids.device
    real = (torch.ones(shape, dtype=torch.bool, device=device) if attention_mask is None
            else _token_flags("attention_mask", attention_mask, shape, device))
    training = _token_flags("train_mask", train_mask, shape, device) & real
    may_train = (torch.ones_like(real) if loss_mask is None else _token_flags("loss_mask", loss_mask, shape, device))
    prediction = real[:, :-1] & real[:, 1:]  # (t, t + 1) both real
    if segment_ids is not None:
        segment_ids = torch.as_tensor(segment_ids, device=device).long()
        if tuple(segment_ids.shape) != tuple(shape):
            raise ValueError(f"`segment_ids` must have the shape of input_ids {tuple(shape)}, got "
                             f"{tuple(segment_ids.shape)}.")
        steps = segment_ids[:, 1:] - segment_ids[:, :-1]
        if (prediction & (steps < 0)).any():
            raise ValueError("`segment_ids` must be numbered in order (non-decreasing along each row's real tokens): "
                             "each packed sequence is one contiguous run of tokens.")
        prediction = prediction & (steps == 0)
    if position_ids is None:
        position_ids = default_position_ids(real, segment_ids)
    elif tuple(position_ids.shape) != tuple(shape):
        raise ValueError(f"`position_ids` must have the shape of input_ids {tuple(shape)}, got "
                         f"{tuple(position_ids.shape)}.")
    return TargetMasks(train=prediction & training[:, 1:] & may_train[:, 1:], eval=prediction & ~training[:, 1:],
                       train_tokens=training, attention_mask=real, position_ids=position_ids, segment_ids=segment_ids)


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """-log p(x_{t+1} | x_{<=t}) at every position: logits (B, T, V), input_ids (B, T) -> (B, T-1); half-precision
    logits are scored in float32."""
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                           reduction="none").view(input_ids.shape[0], -1)


def gradient_span(masks: TargetMasks) -> int:
    """How many leading positions the training loss of the batch depends on (causal attention): up to its last
    training target's token; 0 without training targets."""
    columns = masks.train.any(0)
    if not columns.any():
        return 0
    return int(columns.nonzero().max()) + 2


__all__ = ["TargetMasks", "build_target_masks", "default_position_ids", "gradient_span", "next_token_nll"]
