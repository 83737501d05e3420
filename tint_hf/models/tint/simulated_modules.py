"""TinT's simulated operations: each auxiliary operation (and its backward) as a standard transformer module.

Layout. TinT works on P prefix rows of width D = d (r + 1) and T token rows. Prefix row j of a simulated d x d
linear map (W, b) holds r = d / P consecutive rows ``W[r j : r j + r]`` and one copy of b (read from prefix 0).
Token rows carry the auxiliary signal in their first d coordinates; the activations a backward module needs are
passed from its forward module along explicit skip edges (:class:`BlockMemory`) instead of reserved residual
channels, so token rows are stored d wide.

Modules (each a standard transformer operation; construction matrices are index operations, never dense):

* :class:`TinTLinearForward`: linear attention, token queries x_t split in s = d / P shards of width P, prefix
  keys (one weight head per row slot a and shard c); the value of prefix j places its score in coordinate r j + a.
  ``y = x W^T + b`` with exactly the FLOPs of the matrix product.
* :class:`TinTLinearBackwardDescent`: one layer with backward heads (token rows: ``dx = W^T dy``) and descent heads
  (prefix rows attend to training-part tokens: ``dW = sum_t dy_t x_t^T``).
* :class:`TinTNorm`: LayerNorm / RMSNorm as normalisation over the d signal coordinates, then a linear forward
  with diag(gamma) prefixes; its backward is TinT's finite difference ``N (f(x + g / N) - f(x))`` (or the exact VJP).
* :class:`TinTActivation`: the auxiliary non-linearity and its finite-difference backward (gated MLPs multiply
  it with the up projection, elementwise).
* :class:`TinTSoftmaxAttention`: causal softmax attention among token rows (prefix keys masked), one TinT head per
  auxiliary head (rotary positions rotate q and k; grouped K/V heads are shared), and its value-path backward
  ``dv_i = sum_j A_ji M_ij do_j`` (stop-gradient on the scores).
* :class:`TinTLossGradient`: softmax attention from each token to V vocabulary slots (keys and values = rows of
  the embedding matrix E), minus the next token's embedding: ``dy_t = E^T (softmax(E y_t) - e_{x_{t+1}})``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .auxiliary import AuxiliarySpec, apply_rotary
from .prefix_updates import FactoredPrefix, Prefix, factored

LINEAR_SLOTS = ("q", "k", "v", "o")
NORM_SLOTS = ("ln1", "ln2")


def mlp_slots(spec: AuxiliarySpec) -> tuple[str, ...]:
    """Prefix slots of the MLP, each with C = ceil(d_ff / d) chunks of d x d."""
    return (("gate",) if spec.gated_mlp else ()) + ("fc1", "fc2")


def mlp_chunks(spec: AuxiliarySpec) -> int:
    """C: the MLP is simulated as C chunks of d x d maps (d_ff is zero-padded up to C d, which is exact)."""
    return -(-spec.ffn_dim // spec.hidden_size)



# --------------------------------------------------------------------------------------------------------------
# Prefix layout
# --------------------------------------------------------------------------------------------------------------
def stack_into_prefixes(weight: torch.Tensor, bias: torch.Tensor, num_prefixes: int) -> torch.Tensor:
    """Store a d x d linear map in P prefix embeddings: (..., d, d), (..., d) -> (..., P, D = d (r + 1)).

    Prefix j holds rows ``r j .. r j + r - 1`` of ``weight`` side by side, then a copy of ``bias``.
    """
    d = weight.shape[-1]
    rows = weight.reshape(*weight.shape[:-2], num_prefixes, d * d // num_prefixes)
    return torch.cat([rows, bias.unsqueeze(-2).expand(*bias.shape[:-1], num_prefixes, d)], dim=-1)


def prefix_weight(prefix: torch.Tensor, d: int) -> torch.Tensor:
    """The d x d weight stored in prefixes (..., P, D)."""
    return prefix[..., : prefix.shape[-1] - d].reshape(*prefix.shape[:-2], d, d)


def prefix_bias(prefix: torch.Tensor, d: int) -> torch.Tensor:
    """The bias stored in prefixes (..., P, D): prefix 0's bias slot."""
    return prefix[..., 0, -d:]


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------
class TinTLinearForward(nn.Module):
    """y = x W^T + b as linear attention from token rows to the P prefix rows holding (W, b).

    Weight head (a, c) (a < r row slot, c < s = d / P input shard): query(t) = x_t[c P : (c + 1) P],
    key(j) = prefix_j[a d + c P : a d + (c + 1) P], value(j) = e_j, placed at output coordinate r j + a;
    the s shards of a row are summed. Bias head: query(t) = key(0) = e_0, value = prefix 0's bias slot.

    Shapes: x (B, G | 1, T, d), prefixes (B | 1, G, P, D) for G maps applied in parallel -> (B, G, T, d).
    Prefixes with per-row updates kept as factors (:class:`FactoredPrefix`) add their low-rank correction.
    """

    def __init__(self, d: int, num_prefixes: int):
        super().__init__()
        self.d, self.P = d, num_prefixes
        self.r = d // num_prefixes

    def keys(self, prefixes: torch.Tensor) -> torch.Tensor:
        """(B, G, P, D) -> weight-head keys (B, G, P, r, s, P)."""
        return prefixes[..., : self.r * self.d].unflatten(-1, (self.r, self.d // self.P, self.P))

    def forward(self, x: torch.Tensor, prefixes: Prefix) -> torch.Tensor:
        if isinstance(prefixes, FactoredPrefix):
            return self.forward(x, prefixes.base) + prefixes.correction(x)
        queries = x.unflatten(-1, (self.d // self.P, self.P))                           # (B, G, T, s, P)
        scores = torch.einsum("bgtcp,bgjacp->bgtja", queries, self.keys(prefixes))       # (B, G, T, P, r)
        return scores.flatten(-2) + prefix_bias(prefixes, self.d).unsqueeze(-2)


class TinTLinearBackwardDescent(TinTLinearForward):
    """Backward heads on token rows and descent heads on prefix rows, in one layer.

    Backward head (a, c): query(t) = dy_t at coordinates (a, r + a, ..., r (P-1) + a), key(j) = e_j,
    value(j) = prefix_j's (a, c) chunk: ``dx_t = W^T dy_t``.
    Descent head (a, c): query(j) = e_j, key(t) = the same strided dy_t, value(t) = -lr_t x_t[c P : (c + 1) P]
    where ``lr_t`` is the inner learning rate on training-part tokens and 0 elsewhere: prefix rows receive
    ``-lr sum_t dy_t x_t^T`` (bias heads: ``-lr sum_t dy_t`` into prefix 0's bias slot).

    The update is returned as factors over the prefixes read (:class:`FactoredPrefix`: ``lr_t dy_t`` and ``x_t``
    of the training positions), so a row's own update costs 2 N d numbers, not a copy of the prefixes.

    Shapes: dy (B, G, T, d), x (B, G | 1, T, d), prefixes (B | 1, G, P, D), token_lr (B, T) ->
    dx (B, G, T, d), new prefixes (B, G, P, D) as a :class:`FactoredPrefix`.
    """

    def forward(self, dy: torch.Tensor, x: torch.Tensor, prefixes: Prefix, token_lr: torch.Tensor,
                update_weight: bool = True,
                update_bias: torch.Tensor | bool = True) -> tuple[torch.Tensor, FactoredPrefix]:
        prefixes = factored(prefixes)
        strided = dy.unflatten(-1, (self.P, self.r))                                     # (B, G, T, P, r)
        dx = torch.einsum("bgtja,bgjacp->bgtcp", strided, self.keys(prefixes.base)).flatten(-2)
        dx = dx + prefixes.transposed_correction(dy)
        training = token_lr.ne(0).any(0)                                                # (T,) positions that train
        scaled = (dy * token_lr[:, None, :, None].to(dy.dtype))[..., training, :]        # (B, G, N, d)
        bias_delta = None
        if update_bias is not False:
            bias_delta = scaled.sum(-2)                                                  # (B, G, d)
            if isinstance(update_bias, torch.Tensor):                                    # per-map switch (G,)
                bias_delta = bias_delta * update_bias.to(bias_delta.dtype)[:, None]
        if not update_weight:
            return dx, prefixes.plus(bias=bias_delta)
        return dx, prefixes.plus(scaled, x[..., training, :], bias=bias_delta)


def finite_difference(fn, x: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
    """TinT's first-order backward ``N (fn(x + g / N) - fn(x))`` (= J_fn(x) g for symmetric J_fn, up to O(1/N)).

    The difference cancels about log10(N) digits, so half-precision inputs are evaluated in float32 (in bf16, x + g/N
    would round back to x); float32 / float64 are used as they are.
    """
    work = torch.promote_types(x.dtype, torch.float32)
    x_, grad_ = x.to(work), grad.to(work)
    return (scale * (fn(x_ + grad_ / scale) - fn(x_))).to(x.dtype)


class TinTNorm(nn.Module):
    """LayerNorm / RMSNorm as normalisation over the d signal coordinates followed by a linear forward with
    diag(gamma) prefixes (and beta in the bias slot; zero for RMSNorm).

    Backward: ``g_hat = W^T dy = gamma * dy`` (linear backward), then the normalisation's VJP, either by TinT's
    finite difference ``N (f(x + g_hat / N) - f(x))`` (linear -> normalise -> linear) or exactly
    (LayerNorm: ``(g - mean(g) - x_hat mean(g x_hat)) / sigma``; RMSNorm: ``(g - x_hat mean(g x_hat)) / rms``).
    Descent: beta from ``-lr sum_t dy_t`` and, unless bias-only, the diagonal gamma from ``-lr sum_t dy_t x_hat_t``.
    """

    def __init__(self, spec: AuxiliarySpec, num_prefixes: int):
        super().__init__()
        self.d, self.P, self.eps, self.kind = spec.hidden_size, num_prefixes, spec.norm_eps, spec.norm
        self.affine = TinTLinearForward(self.d, num_prefixes)
        self.affine_backward = TinTLinearBackwardDescent(self.d, num_prefixes)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (self.d,), eps=self.eps)
        return F.layer_norm(x, (self.d,), eps=self.eps)

    def forward(self, x: torch.Tensor, prefix: Prefix) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d), prefix (B | 1, P, D) -> (y, x_hat)."""
        x_hat = self.normalize(x)
        return self.affine(x_hat.unsqueeze(1), prefix.unsqueeze(1)).squeeze(1), x_hat

    def backward_descent(self, dy: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, prefix: Prefix,
                         token_lr: torch.Tensor, bias_only: bool, mode: str,
                         fd_scale: float) -> tuple[torch.Tensor, FactoredPrefix]:
        g_hat, new = self.affine_backward(dy.unsqueeze(1), x_hat.unsqueeze(1), prefix.unsqueeze(1), token_lr,
                                          update_weight=False, update_bias=self.kind == "layernorm")
        g_hat, new = g_hat.squeeze(1), new.squeeze(1)
        if not bias_only:  # gamma is a diagonal matrix: descend on its diagonal only
            gamma_delta = torch.einsum("btd,btd->bd", dy * token_lr.unsqueeze(-1).to(dy.dtype), x_hat)
            new = new.plus(diag=gamma_delta)
        if mode == "fd":
            return finite_difference(self.normalize, x, g_hat, fd_scale), new
        projection = x_hat * (g_hat * x_hat).mean(-1, keepdim=True)
        if self.kind == "rmsnorm":
            return (g_hat - projection) / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps), new
        sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + self.eps)
        return (g_hat - g_hat.mean(-1, keepdim=True) - projection) / sigma, new


class TinTActivation(nn.Module):
    """The auxiliary non-linearity; backward ``N (act(z + g / N) - act(z))`` or exactly ``act'(z) g``."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.act = ACT2FN[name]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(z)

    def backward(self, grad: torch.Tensor, z: torch.Tensor, mode: str, fd_scale: float) -> torch.Tensor:
        if mode == "fd":
            return finite_difference(self.act, z, grad, fd_scale)
        with torch.enable_grad():
            z_ = z.detach().requires_grad_(True)
            (dz,) = torch.autograd.grad(self.act(z_), z_, grad)
        return dz


class TinTSoftmaxAttention(nn.Module):
    """Causal softmax attention among token rows; TinT head i simulates auxiliary head i.

    Forward: ``o = softmax(q k^T * scale + mask) v`` per head, with q and k rotated by the position angle for
    rotary families and the K/V heads shared by groups of query heads (GQA). Backward (value path, stop-gradient
    on the scores): the attention probabilities are recomputed from the stored q, k, transposed and masked by
    TinT's M: ``dv_i = sum_j A_ji dout_j`` over j = i or j in the training part, summed over each K/V group.
    Shapes: q (B, T, d); k, v (B, T, d) whose first d_kv coordinates are used; rotary (cos, sin) or None.
    """

    def __init__(self, spec: AuxiliarySpec):
        super().__init__()
        self.h, self.kv, self.dh, self.scale = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.attention_scale

    def heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """(B, T, >= n dh) -> (B, h, T, dh): the first n heads, each repeated for its h / n query heads."""
        t = t[..., : n * self.dh].unflatten(-1, (n, self.dh)).transpose(1, 2)
        return t.repeat_interleave(self.h // n, dim=1)

    def queries_keys(self, q: torch.Tensor, k: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = self.heads(q, self.h), self.heads(k, self.kv)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                rotary) -> torch.Tensor:
        q, k = self.queries_keys(q, k, rotary)
        out = F.scaled_dot_product_attention(q, k, self.heads(v, self.kv), attn_mask=allowed, scale=self.scale)
        return out.transpose(1, 2).flatten(-2)                                          # (B, T, d)

    def value_backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor,
                       train_tokens: torch.Tensor, rotary) -> torch.Tensor:
        """dout (B, T, d) at the attention output -> dv (B, T, d), zero beyond d_kv."""
        q, k = self.queries_keys(q, k, rotary)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        probs = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)  # (B, h, T, T)
        own = torch.eye(probs.shape[-1], dtype=torch.bool, device=probs.device)
        probs = torch.where(train_tokens[:, None, :, None] | own, probs, 0.0)             # TinT's mask M
        dv = probs.transpose(-1, -2) @ self.heads(dout, self.h)                         # (B, h, T, dh)
        dv = dv.unflatten(1, (self.kv, self.h // self.kv)).sum(2)                        # sum over each group
        dv = dv.transpose(1, 2).flatten(-2)
        return F.pad(dv, (0, dout.shape[-1] - dv.shape[-1]))


class TinTLossGradient(nn.Module):
    """Gradient of the summed next-token loss at the final-LN output y, on training targets only.

    ``ce``: softmax attention of y_t over V vocabulary slots (keys = values = rows of E) minus E[x_{t+1}];
    ``quad``: ``E^T E y_t - E[x_{t+1}]``; ``uniform``: ``mean_v E_v - E[x_{t+1}]``.
    Shapes: y (B, T, d), E (V, d), input_ids (B, T), train targets (B, T-1) -> dy (B, T, d).
    """

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, y: torch.Tensor, embedding: torch.Tensor, input_ids: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        b, t = targets.nonzero(as_tuple=True)          # only positions with a training target carry a gradient
        y_n = y[b, t]                                   # (N, d)
        if self.mode == "ce":
            predicted = (y_n @ embedding.T).softmax(-1) @ embedding
        elif self.mode == "quad":
            predicted = (y_n @ embedding.T) @ embedding
        else:
            predicted = embedding.mean(0).expand_as(y_n)
        grad = torch.zeros_like(y)
        grad[b, t] = predicted - F.embedding(input_ids[b, t + 1], embedding)
        return grad
