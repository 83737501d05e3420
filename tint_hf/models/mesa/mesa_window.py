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

Cost: decoding is constant per token; the training / prefill form scores each chunk of w queries against its 2w
candidate keys, linear in T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def delay(stream: torch.Tensor, history: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Delay a stream (B, heads, T, ...) by w positions: ``history`` (B, heads, w, ...) holds the w inputs before
    the call (zeros when none). ``valid`` (B, T) marks where the delayed input belongs to the same document; elsewhere
    it is zeroed. Returns the delayed stream (B, heads, T, ...) and the new history (the last w inputs)."""
    w = history.shape[2]
    joined = torch.cat([history.to(stream.dtype), stream], dim=2)
    shape = (valid.shape[0], 1, valid.shape[1]) + (1,) * (stream.dim() - 3)
    return joined[:, :, : stream.shape[2]] * valid.view(shape).to(stream.dtype), joined[:, :, -w:]


def window_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, real: torch.Tensor,
                     docs: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each query over the last w positions, chunk by chunk (linear in T).

    q (B, h, T, d); keys / values (B, h, w + T, d): w history slots, then the call's tokens; ``real`` and ``docs``
    (B, w + T). Query i (call position) attends to key kappa when kappa - w lies in (i - w, i], the key is a real
    token of i's document, or kappa - w = i (so that every query has a key). The queries are cut into chunks of w; the
    keys of chunk c all lie in the 2w slots [c w, c w + 2w). Returns the output (B, h, T, d) and the log-normaliser
    L (B, h, T, 1)."""
    w, length = keys.shape[2] - q.shape[2], q.shape[2]
    chunks = -(-length // w)
    pad = chunks * w - length
    q = F.pad(q, (0, 0, 0, pad)).unflatten(2, (chunks, w))                                # (B, h, n, w, d)
    keys, values = (F.pad(x, (0, 0, 0, pad)).unfold(2, 2 * w, w).transpose(-1, -2) for x in (keys, values))
    real, key_docs = (F.pad(x, (0, pad)).unfold(1, 2 * w, w) for x in (real, docs))      # (B, n, 2w)
    query_docs = F.pad(docs[:, w:], (0, pad)).unflatten(1, (chunks, w))                  # (B, n, w)
    offset = torch.arange(w, device=q.device)[:, None] - torch.arange(2 * w, device=q.device) + w  # (w, 2w)
    band = (offset >= 0) & (offset < w)
    allowed = band & (query_docs[..., :, None] == key_docs[..., None, :]) & real[..., None, :].bool()
    allowed = (allowed | (offset == 0)).unsqueeze(1)                                       # (B, 1, n, w, 2w)
    scores = (q @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.exp(scores - lse) @ values
    return out.flatten(2, 3)[:, :, :length], lse.flatten(2, 3)[:, :, :length]


def window_share(lse: torch.Tensor, older: torch.Tensor, older_log_weight: torch.Tensor) -> torch.Tensor:
    """a = sigmoid(L - mu_h - log n): the window's share of the attention mass, 1 where n = 0.
    lse (B, h, T, 1), older n (B, T), older_log_weight mu (h,) -> (B, h, T, 1)."""
    n = older[:, None, :, None].to(lse.dtype)
    logit = lse - older_log_weight.to(lse.dtype)[:, None, None] - torch.log(n.clamp_min(1.0))
    return torch.where(n > 0, torch.sigmoid(logit), torch.ones_like(logit))


def attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


__all__ = ["attention_scale", "delay", "window_attention", "window_share"]
