"""A softmax window inside a mesa layer (``mesa_window = w > 0``), in the manner of LoLCATs' window + linear hybrid.

Per query head and position i (tokens of i's packed document that are not padding):

    window  W_i = {j : i - w < j <= i}                  softmax attention of the base model's q, k, v (RoPE'd)
    older   O_i = {j : j <= i - w},  n_i = |O_i|        the mesa layer run on its inputs delayed by w tokens
    s_ij    = q_i . k_j / sqrt(d),  L_i = logsumexp_{j in W_i} s_ij
    y_i     = a_i softmax_W(s_i) V  +  (1 - a_i) mesa_i,    a_i = sigmoid(L_i - mu_h - log n_i)  (a_i = 1 if n_i = 0)

LoLCATs normalises its window and linear terms by one shared denominator, so each part weighs as its attention mass.
The mesa part has no mass of its own; ``mu_h`` (``older_log_weight``, per head, trained) gives every older token the
unnormalised weight ``exp(mu_h)``, so the older part's mass is ``n_i exp(mu_h)`` and ``a_i`` is the window's share of
the total. While no token is older than the window the layer is exactly the base model's softmax attention.

The mesa part's delayed stream holds at position i the (k, v, log forget gate, input gate) of token i - w, or nothing
(input gate 0, forget gate 1) when that token is outside i's document or before the sequence; its state after
position i therefore covers exactly O_i. A decode cache keeps the last w tokens (their window keys and values and
their pending mesa inputs) next to the mesa state: constant memory.

Cost: decoding is constant per token; the training / prefill form scores the window with a dense (T, w + T) masked
score matrix, which is quadratic in T like softmax attention (a banded kernel, linear in T, is not built).
"""

from __future__ import annotations

import math

import torch


def delay(stream: torch.Tensor, history: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Delay a stream (B, heads, T, ...) by w positions: ``history`` (B, heads, w, ...) holds the w inputs before
    the call (zeros when none). ``valid`` (B, T) marks where the delayed input belongs to the same document; elsewhere
    it is zeroed. Returns the delayed stream (B, heads, T, ...) and the new history (the last w inputs)."""
    w = history.shape[2]
    joined = torch.cat([history.to(stream.dtype), stream], dim=2)
    shape = (valid.shape[0], 1, valid.shape[1]) + (1,) * (stream.dim() - 3)
    return joined[:, :, : stream.shape[2]] * valid.view(shape).to(stream.dtype), joined[:, :, -w:]


def window_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to ``allowed`` (B, 1, T, w + T) (every row allows at least its own position):
    q (B, h, T, d), keys / values (B, h, w + T, d) -> output (B, h, T, d) and the log-normaliser L (B, h, T, 1)."""
    scores = (q @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.exp(scores - lse) @ values, lse


def window_mask(real: torch.Tensor, docs: torch.Tensor, w: int) -> torch.Tensor:
    """(B, 1, T, w + T) bool: query i (call position) may attend to key kappa (w history slots, then the call's
    tokens) when kappa - w lies in (i - w, i], the key is a real token of i's document, or kappa - w = i.
    ``real`` and ``docs`` are (B, w + T)."""
    length = real.shape[1] - w
    offset = torch.arange(length, device=real.device)[:, None] - (torch.arange(w + length, device=real.device) - w)
    band = (offset >= 0) & (offset < w)                                                  # (T, w + T)
    same = docs[:, w:, None] == docs[:, None, :]                                         # (B, T, w + T)
    return ((band & same & real[:, None, :].bool()) | (offset == 0)).unsqueeze(1)


def window_share(lse: torch.Tensor, older: torch.Tensor, older_log_weight: torch.Tensor) -> torch.Tensor:
    """a = sigmoid(L - mu_h - log n): the window's share of the attention mass, 1 where n = 0.
    lse (B, h, T, 1), older n (B, T), older_log_weight mu (h,) -> (B, h, T, 1)."""
    n = older[:, None, :, None].to(lse.dtype)
    logit = lse - older_log_weight.to(lse.dtype)[:, None, None] - torch.log(n.clamp_min(1.0))
    return torch.where(n > 0, torch.sigmoid(logit), torch.ones_like(logit))


def attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


__all__ = ["attention_scale", "delay", "window_attention", "window_mask", "window_share"]
