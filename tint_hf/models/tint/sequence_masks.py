"""Which next-token predictions belong to the training part and which to the evaluation part.

Conventions (shared by ``TinTForCausalLM``, ``tint_hf.simulate`` and the evaluation code):

* ``attention_mask`` (B, T): 1 for real tokens, 0 for padding (either side).
* ``train_mask`` (B, T): 1 for tokens in the *training part* of the sequence.
* ``loss_mask`` (B, T), optional: 1 for tokens that count as training targets (e.g. label words only).
* ``segment_ids`` (B, T), optional: packs several independent sequences into one row. Tokens attend only to earlier
  tokens of their own segment, positions restart at 0 in each segment, and no target crosses a segment boundary.
  Numbered in order (non-decreasing along the real tokens of a row). With the training part on some segments and the
  evaluation part on another, one pass trains on the separate sequences with one summed step, then evaluates the
  last one alone (the single-FT variant of dynamic evaluation).
* Logits at position t predict token t+1. Position t has a **training target** if token t+1 is in the training part
  (and in ``loss_mask``), an **evaluation target** if token t+1 is not in the training part; both require tokens t
  and t+1 to be real (and in the same segment). The inner SGD step uses the *summed* loss over training targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TargetMasks:
    """Boolean masks over next-token predictions, all of shape (B, T-1) except ``train_tokens`` (B, T)."""

    train: torch.Tensor
    eval: torch.Tensor
    train_tokens: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor | None = None


def _as_bool(name: str, mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device)
    if mask.shape != shape:
        raise ValueError(f"`{name}` has shape {tuple(mask.shape)} but input_ids has shape {tuple(shape)}; "
                         f"pass one 0/1 value per token, shape (batch, seq_len).")
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        bad = mask[(mask != 0) & (mask != 1)].unique()[:5].tolist()
        raise ValueError(f"`{name}` must hold only 0 and 1 (one flag per token), got values such as {bad}.")
    return mask.bool()


def default_position_ids(attention_mask: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Positions that count only real tokens, so that left padding does not shift them, restarting at 0 at every
    change of ``segment_ids`` when given: (B, T) long."""
    real = attention_mask.long()
    seen = real.cumsum(-1)  # real tokens up to and including t
    if segment_ids is None:
        return (seen - 1).clamp(min=0)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    before_segment = torch.where(starts, seen - real, 0).cummax(-1).values  # real tokens before t's segment
    return (seen - before_segment - 1).clamp(min=0)


def build_target_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, train_mask: torch.Tensor | None,
                       loss_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                       segment_ids: torch.Tensor | None = None) -> TargetMasks:
    """Validate the masks and derive training / evaluation targets."""
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
    if input_ids.shape[1] < 2:
        raise ValueError("Sequences need at least 2 tokens (one prediction).")
    shape, device = input_ids.shape, input_ids.device
    if train_mask is None:
        raise ValueError("`train_mask` is required: a (batch, seq_len) 0/1 mask with 1 on the tokens of the training "
                         "part (e.g. the first half of each block, or the demonstrations of a prompt).")
    attention = _as_bool("attention_mask", attention_mask, shape, device)
    if attention is None:
        attention = torch.ones(shape, dtype=torch.bool, device=device)
    train_tokens = _as_bool("train_mask", train_mask, shape, device) & attention
    loss = _as_bool("loss_mask", loss_mask, shape, device)
    pair_real = attention[:, :-1] & attention[:, 1:]
    if segment_ids is not None:
        segment_ids = torch.as_tensor(segment_ids, device=device).long()
        if segment_ids.shape != shape:
            raise ValueError(f"`segment_ids` has shape {tuple(segment_ids.shape)}, expected {tuple(shape)}.")
        if (pair_real & (segment_ids[:, 1:] < segment_ids[:, :-1])).any():
            raise ValueError("`segment_ids` must be numbered in order (non-decreasing along each row's real tokens): "
                             "each packed sequence is one contiguous run of tokens.")
        pair_real = pair_real & (segment_ids[:, 1:] == segment_ids[:, :-1])
    train_targets = pair_real & train_tokens[:, 1:]
    if loss is not None:
        train_targets = train_targets & loss[:, 1:]
    eval_targets = pair_real & ~train_tokens[:, 1:]
    if position_ids is None:
        position_ids = default_position_ids(attention, segment_ids)
    elif position_ids.shape != shape:
        raise ValueError(f"`position_ids` has shape {tuple(position_ids.shape)}, expected {tuple(shape)}.")
    return TargetMasks(train=train_targets, eval=eval_targets, train_tokens=train_tokens,
                       attention_mask=attention, position_ids=position_ids, segment_ids=segment_ids)


def default_train_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, fraction: float) -> torch.Tensor:
    """(B, T) bool: the first ``floor(fraction * n)`` of each row's n real tokens (TinT's training part when a call
    gives none: ``config.default_train_fraction``)."""
    real = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    counts = real.sum(-1, keepdim=True)
    return real.bool() & (default_position_ids(real) < (counts * fraction).floor().long())


def step_sizes(inner_lr: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """The inner learning rate of every row, (B, 1) float64, from one number or one per row (B,)."""
    if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float, torch.Tensor)):
        raise TypeError(f"inner_lr must be a number or a (batch,) tensor of numbers, got {type(inner_lr).__name__}.")
    lr = torch.as_tensor(inner_lr, dtype=torch.float64, device=device)
    if lr.dim() > 1 or (lr.dim() == 1 and lr.shape[0] != batch):
        raise ValueError(f"inner_lr must be a number or have one value per row, shape ({batch},); got shape "
                         f"{tuple(lr.shape)}.")
    if not torch.isfinite(lr).all():
        raise ValueError(f"inner_lr must be finite, got {lr.tolist()}.")
    return lr.expand(batch).reshape(batch, 1).contiguous()


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """-log p(x_{t+1} | x_{<=t}) for every position: logits (B, T, V), input_ids (B, T) -> (B, T-1)."""
    logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")


def gradient_span(masks: TargetMasks) -> int:
    """Number of leading positions the training loss depends on (causal attention): up to its last target token,
    0 if there is none."""
    positions = masks.train.any(0).nonzero()
    return 0 if positions.numel() == 0 else int(positions.max()) + 2


def check_call_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                      segment_ids: torch.Tensor | None, vocab: int, max_positions: int) -> None:
    """Refuse ids outside the vocabulary, sequences or positions beyond the position table, and packed documents
    (positions restarting inside a row) without ``segment_ids``, naming the argument and the fix."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}; "
                         "use input_ids[None] for a single sequence.")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise ValueError(f"input_ids must lie in [0, {vocab}) (the auxiliary vocabulary), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]; check the tokenizer.")
    if input_ids.shape[1] > max_positions:
        raise ValueError(f"Sequence length {input_ids.shape[1]} exceeds the auxiliary model's "
                         f"{max_positions} positions.")
    if position_ids is not None and (position_ids.min() < 0 or position_ids.max() >= max_positions):
        raise ValueError(f"position_ids must lie in [0, {max_positions}) (the auxiliary position "
                         f"table), got values in [{int(position_ids.min())}, {int(position_ids.max())}].")
    if position_ids is not None and segment_ids is None and position_ids.shape == input_ids.shape:
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        restart = (position_ids[:, 1:] <= position_ids[:, :-1]) & real[:, 1:] & real[:, :-1]
        if bool(restart.any()):
            raise ValueError("position_ids restart inside a row (packed documents), but without segment_ids "
                             "TinT lets every token attend to the whole row: pass segment_ids numbering the "
                             "documents (positions then restart by themselves), or one document per row.")


def causal_allowed(attention_mask: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) real-token mask -> (B, 1, T, T) causal mask among real tokens (padded rows attend to themselves),
    restricted to each token's own segment when ``segment_ids`` (B, T) is given."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    allowed = causal & attention_mask[:, None, None, :].bool()
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return allowed | eye


def window_start(masks: TargetMasks, logits_to_keep: int) -> int:
    """First position whose output is returned: ``T - logits_to_keep`` (every position for 0)."""
    length = masks.train_tokens.shape[1]
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0 keeps every position), got {logits_to_keep!r}.")
    return length - logits_to_keep if 0 < logits_to_keep < length else 0


def eval_loss(logits: torch.Tensor, labels: torch.Tensor, eval_targets: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``labels`` at evaluation targets (B, T-1) (labels equal to -100 are ignored)."""
    valid = eval_targets & (labels[:, 1:] != -100)
    if not valid.any():
        raise ValueError("No evaluation target for the loss: every predicted token is in the training part (or its "
                         "label is -100). Leave part of each sequence out of train_mask, or drop labels.")
    nll = next_token_nll(logits, labels.clamp(min=0))
    return (nll * valid).sum() / valid.sum()
