"""``tint_step``: the approximate SGD step that TinT simulates, as a functional reference (oracle).

It re-implements the auxiliary forward (OPT, GPT-2, Llama; pre-norm) with per-sequence weights and runs torch autograd
through it, with TinT's approximations (``tint.md`` §3.2) inserted as switchable autograd rules:

* ``stop_attention_grad``: no gradient through the attention probabilities; only the value path
  ``dv_i = sum_j A_ji dout_j`` survives, so ``W_Q, W_K`` get no gradient and lower layers see only ``W_V^T dv``.
* ``train_token_mask``: TinT's descent sums ``dy_t x_t^T`` over *training-part* tokens only, and its value-path
  backward lets query j pass gradient to earlier keys only if j is in the training part. Both are exact when the
  training part is a prefix of the sequence (the usual case) and matter only for interleaved masks.
* ``freeze_qk``: ``W_Q, b_Q, W_K, b_K`` are not updated.
* ``ln_bias_only``: LayerNorm gamma is frozen, only beta is updated.
* ``freeze_embeddings``: token/position embeddings and the LM head are not updated.
* ``backward="fd"``: LayerNorm and activation backward by TinT's finite difference
  ``dx = N * (f(x + g/N) - f(x))`` with ``N = fd_scale`` (``"exact"`` uses the true VJP).
* ``loss_gradient``: ``"ce"`` (exact cross-entropy gradient), ``"quad"`` (``U^T(U y - e_target)``) or
  ``"uniform"`` (``mean_v U_v - U_target``), the gradient TinT injects at the final-LN output ``y``.
* ``authors_fc2_bias_bug``: the authors' code gives the fc2 bias ``d_ff/d`` times the step (off by default).

Only the top ``n_layers`` layers (and the final LN) are updated; gradients are not propagated below them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..models.tint.auxiliary import (
    AuxiliarySpec,
    apply_rotary,
    layer_key,
    read_auxiliary,
    rotary_cos_sin,
    to_hf_parameters,
)
from .exact import _eval_mode, _validate_step_args
from .masks import TargetMasks, build_target_masks, gradient_span
from .outputs import SimulationOutput, summarize


@dataclass(frozen=True)
class Approximations:
    """TinT's departures from exact SGD; the defaults are TinT's own setting. See the module docstring."""

    stop_attention_grad: bool = True
    train_token_mask: bool = True
    freeze_qk: bool = True
    ln_bias_only: bool = True
    freeze_embeddings: bool = True
    backward: Literal["fd", "exact"] = "fd"
    fd_scale: float = 1000.0
    loss_gradient: Literal["ce", "quad", "uniform"] = "ce"
    authors_fc2_bias_bug: bool = False

    def __post_init__(self) -> None:
        if self.backward not in ("fd", "exact"):
            raise ValueError(f"backward={self.backward!r}: use 'fd' (TinT's finite difference) or 'exact'.")
        if self.loss_gradient not in ("ce", "quad", "uniform"):
            raise ValueError(f"loss_gradient={self.loss_gradient!r}: use 'ce', 'quad' or 'uniform'.")
        if self.fd_scale <= 0:
            raise ValueError(f"fd_scale={self.fd_scale} must be positive.")

    @classmethod
    def none(cls) -> Approximations:
        """No approximation at all: ``tint_step`` then equals ``exact_step`` on all parameters."""
        return cls(stop_attention_grad=False, train_token_mask=False, freeze_qk=False, ln_bias_only=False,
                   freeze_embeddings=False, backward="exact")

    def with_(self, **changes) -> Approximations:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _FiniteDifferenceBackward(torch.autograd.Function):
    """y = f(x); backward: dx = N * (f(x + g/N) - f(x)) (TinT's first-order approximation of J_f(x)^T g)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn, scale: float) -> torch.Tensor:
        y = fn(x)
        ctx.save_for_backward(x, y)
        ctx.fn, ctx.scale = fn, scale
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y = ctx.saved_tensors
        return ctx.scale * (ctx.fn(x + grad / ctx.scale) - y), None, None


class _RowMaskedLinear(torch.autograd.Function):
    """y = x W^T (+ b) whose weight/bias gradients sum only over rows with ``row_mask`` (TinT's descent)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_mask: torch.Tensor):
        ctx.save_for_backward(x, weight, row_mask)
        ctx.bias_shape = None if bias is None else bias.shape
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, row_mask = ctx.saved_tensors
        grad_x = grad @ weight
        rows = row_mask.squeeze(-1).any(0)              # tokens that train in some sequence: skip the others
        masked = grad[:, rows] * row_mask[:, rows]
        grad_w = masked.transpose(-1, -2) @ x[:, rows]  # (B, out, in)
        grad_b = masked.sum(-2)                          # (B, out)
        if weight.dim() == 2:                            # shared weight: sum over the batch
            grad_w, grad_b = grad_w.sum(0), grad_b.sum(0)
        return grad_x, grad_w, None if ctx.bias_shape is None else grad_b.reshape(ctx.bias_shape), None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, in) @ weight^T + bias, with weight (out, in) or per-sequence (B, out, in), bias (out) or (B, out)."""
    y = torch.matmul(x, weight.transpose(-1, -2))
    return y if bias is None else y + (bias if bias.dim() == 1 else bias.unsqueeze(-2))


def _per_row(t: torch.Tensor, spec_dim: int) -> torch.Tensor:
    """Broadcast a per-sequence vector (B, d) over tokens; a shared one (d) is left as is."""
    return t if t.dim() == spec_dim else t.unsqueeze(-2)


class _Simulator:
    """The auxiliary forward with TinT's backward rules; one instance per ``tint_step`` call."""

    def __init__(self, spec: AuxiliarySpec, approx: Approximations, masks: TargetMasks):
        self.spec, self.approx, self.masks = spec, approx, masks
        self.act = ACT2FN[spec.activation]
        if approx.train_token_mask:
            self.row_mask = masks.train_tokens.unsqueeze(-1)  # (B, T, 1)
        else:
            self.row_mask = masks.attention_mask.unsqueeze(-1)
        self.row_mask = self.row_mask.to(masks.position_ids.device)
        T = masks.attention_mask.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.row_mask.device).tril()
        keys = masks.attention_mask[:, None, None, :]
        self.allowed = (causal & keys) | torch.eye(T, dtype=torch.bool, device=causal.device)  # (B, 1, T, T)
        self.has_holes = approx.train_token_mask and bool((masks.attention_mask & ~masks.train_tokens).any())

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.norm == "rmsnorm":
            return F.rms_norm(x, x.shape[-1:], eps=self.spec.norm_eps)
        return F.layer_norm(x, x.shape[-1:], eps=self.spec.norm_eps)

    def _through(self, fn, x: torch.Tensor) -> torch.Tensor:
        if self.approx.backward == "fd" and x.requires_grad:
            return _FiniteDifferenceBackward.apply(x, fn, self.approx.fd_scale)
        return fn(x)

    def linear(self, x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        weight, bias = w[f"{name}.weight"], w.get(f"{name}.bias")
        if self.approx.train_token_mask and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            return _RowMaskedLinear.apply(x, weight, bias, self.row_mask.to(x.dtype))
        return _linear(x, weight, bias)

    def norm(self, x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """LayerNorm or RMSNorm; gamma (and beta) gradients read only training-part rows (TinT's descent)."""
        x_hat = self._through(self._normalize, x)
        affine = [_per_row(w[f"{name}.{kind}"], 1) for kind in self.spec.parameter_kinds("ln")]
        gamma, beta = affine[0], (affine[1] if len(affine) > 1 else torch.zeros_like(affine[0]))
        if self.approx.train_token_mask and (gamma.requires_grad or beta.requires_grad):
            m = self.row_mask.to(x.dtype)  # same value as x_hat * gamma + beta
            return x_hat * gamma.detach() + beta.detach() + m * (x_hat.detach() * (gamma - gamma.detach())
                                                                 + (beta - beta.detach()))
        return x_hat * gamma + beta

    def attention(self, u: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        B, T, d = u.shape
        h, dh = self.spec.num_heads, self.spec.head_dim

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, n * dh) -> (B, h, T, dh), k/v groups repeated
            t = t.view(B, T, -1, dh).transpose(1, 2)
            return t.repeat_interleave(h // t.shape[1], dim=1)

        q, k, v = (heads(self.linear(u, w, name)) for name in "qkv")
        if not self.spec.learned_positions:
            cos, sin = rotary_cos_sin(self.spec, self.masks.position_ids, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.approx.stop_attention_grad:
            q, k = q.detach(), k.detach()  # gradient reaches v only, through A^T (the value path)
        if not (self.approx.stop_attention_grad and self.has_holes and v.requires_grad):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed, scale=self.spec.attention_scale)
        else:
            # Query rows outside the training part pass gradient only to their own value (TinT's mask M); this
            # differs from the plain value path only when the training part has holes (it is not a prefix).
            scores = (q @ k.transpose(-1, -2)) * self.spec.attention_scale
            probs = scores.masked_fill(~self.allowed, torch.finfo(scores.dtype).min).softmax(-1)  # (B, h, T, T)
            out = probs @ v
            diag = probs.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)                                # (B, h, T, 1)
            own_only = out.detach() + diag * (v - v.detach())
            out = torch.where(self.masks.train_tokens[:, None, :, None], out, own_only)
        out = out.transpose(1, 2).reshape(B, T, d)
        return self.linear(out, w, "o")

    def block(self, hidden: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = hidden + self.attention(self.norm(hidden, w, "ln1"), w)
        x = self.norm(hidden, w, "ln2")
        if self.spec.gated_mlp:
            a = self._through(self.act, self.linear(x, w, "gate")) * self.linear(x, w, "fc1")
        else:
            a = self._through(self.act, self.linear(x, w, "fc1"))
        return hidden + self.linear(a, w, "fc2")

    def embed(self, weights: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
        tokens = _gather_rows(weights["embed_tokens"], input_ids)
        if not self.spec.learned_positions:
            return tokens
        return tokens + _gather_rows(weights["embed_positions"], self.masks.position_ids + self.spec.position_offset)

    def head(self, hidden: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final-LN output y (B, T, d)."""
        return self.norm(hidden, weights, "final_norm")

    def logits(self, y: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, d) -> (B, T, V)."""
        return torch.matmul(y, output_embedding(self.spec, weights).transpose(-1, -2))

    def training_loss(self, y: torch.Tensor, input_ids: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """Summed loss over training targets whose gradient w.r.t. y is TinT's injected loss gradient.

        Only the N positions with a training target enter the graph: y_n (N, d), U the LM head ((V, d) or per
        sequence (B, V, d)), target rows U[x_{t+1}].
        """
        b, t = self.masks.train.nonzero(as_tuple=True)
        y_n, target = y[b, t], input_ids[b, t + 1]
        head = lm_head if lm_head.dim() == 2 else lm_head[b]                          # (V, d) or (N, V, d)
        if self.approx.loss_gradient == "ce":
            logits = y_n @ head.T if head.dim() == 2 else (head @ y_n.unsqueeze(-1)).squeeze(-1)
            return F.cross_entropy(logits, target, reduction="sum")
        target_rows = _gather_rows(lm_head, input_ids[:, 1:])[b, t]                   # U_target (N, d)
        if self.approx.loss_gradient == "quad":                                      # grad = U^T (U y) - U_target
            logits = y_n @ head.T if head.dim() == 2 else (head @ y_n.unsqueeze(-1)).squeeze(-1)
            surrogate = 0.5 * logits.pow(2).sum(-1) - (target_rows * y_n).sum(-1)
        else:                                                                         # grad = mean_v U_v - U_target
            surrogate = ((head.mean(-2) - target_rows) * y_n).sum(-1)
        return surrogate.sum()


def output_embedding(spec: AuxiliarySpec, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The LM head U (V, d), or per sequence (B, V, d); the token embedding when the two are tied."""
    return weights["embed_tokens" if spec.tied_embeddings else "lm_head"]


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Embedding lookup for a shared (N, d) or per-sequence (B, N, d) table; index (B, T) -> (B, T, d)."""
    if table.dim() == 2:
        return F.embedding(index, table)
    return torch.gather(table, 1, index.unsqueeze(-1).expand(*index.shape, table.shape[-1]))


def _truncate(masks: TargetMasks, span: int) -> TargetMasks:
    """The masks of the first ``span`` positions."""
    return TargetMasks(train=masks.train[:, : span - 1], eval=masks.eval[:, : span - 1],
                       train_tokens=masks.train_tokens[:, :span], attention_mask=masks.attention_mask[:, :span],
                       position_ids=masks.position_ids[:, :span],
                       segment_ids=None if masks.segment_ids is None else masks.segment_ids[:, :span])


def trainable_names(spec: AuxiliarySpec, approx: Approximations, n_layers: int) -> list[str]:
    """Canonical names of the weights TinT updates (see :mod:`tint_hf.models.tint.auxiliary`)."""
    names = []
    for i in range(spec.num_layers - n_layers, spec.num_layers):
        for module in spec.layer_modules():
            if approx.freeze_qk and module in ("q", "k"):
                continue
            kinds = spec.parameter_kinds(module)
            if approx.ln_bias_only and module.startswith("ln"):
                kinds = tuple(k for k in kinds if k == "bias")
            names += [layer_key(i, f"{module}.{kind}") for kind in kinds]
    final = spec.parameter_kinds("ln")
    names += [f"final_norm.{kind}" for kind in final if not (approx.ln_bias_only and kind == "weight")]
    if not approx.freeze_embeddings:
        names += ["embed_tokens"] + (["embed_positions"] if spec.learned_positions else [])
        names += [] if spec.tied_embeddings else ["lm_head"]
    return names


def _check_n_layers(spec: AuxiliarySpec, n_layers: int | None) -> int:
    n_layers = spec.num_layers if n_layers is None else n_layers
    if not 1 <= n_layers <= spec.num_layers:
        raise ValueError(f"n_layers={n_layers} must be between 1 and the auxiliary depth ({spec.num_layers}).")
    return n_layers


def tint_step(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              train_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, *, lr: float, n_steps: int = 1, n_layers: int | None = None,
              approximations: Approximations | None = None, return_params: bool = False) -> SimulationOutput:
    """The approximate SGD step TinT simulates, per sequence, then the prediction with the updated weights.

    Same inputs and output as :func:`tint_hf.simulate.exact_step`; ``approximations`` selects TinT's departures
    from exact SGD (default: TinT's setting). Supports OPT (pre-LN), GPT-2 and Llama-family auxiliary models.
    """
    _validate_step_args(lr, n_steps)
    approx = approximations or Approximations()
    masks = build_target_masks(input_ids, attention_mask, train_mask, loss_mask, position_ids)
    spec, base = read_auxiliary(model)
    n_layers = _check_n_layers(spec, n_layers)
    names = trainable_names(spec, approx, n_layers)
    first = spec.num_layers - n_layers
    # The training loss only depends on the positions up to its last target (causality): gradients are computed
    # on that leading span only; predictions use the whole sequence.
    span = gradient_span(masks)
    full, grad_sim = _Simulator(spec, approx, masks), _Simulator(spec, approx, _truncate(masks, span))

    def layer_weights(weights: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        prefix = f"layers.{i}."
        return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

    def run(sim: _Simulator, weights: dict[str, torch.Tensor], ids: torch.Tensor,
            start: torch.Tensor | None) -> torch.Tensor:
        hidden = start if start is not None else sim.embed(weights, ids)
        for i in range(first if start is not None else 0, spec.num_layers):
            hidden = sim.block(hidden, layer_weights(weights, i))
        return sim.head(hidden, weights)

    with _eval_mode(model), torch.no_grad():
        # Bottom layers are never updated: their output is computed once and reused (as TinT does).
        bottom = None
        if approx.freeze_embeddings:
            bottom = full.embed(base, input_ids)
            for i in range(first):
                bottom = full.block(bottom, layer_weights(base, i))
        logits_before = full.logits(run(full, base, input_ids, bottom), base)
    # Per-sequence weights (a leading batch dim; expanded views until the first update): one step per row.
    current = {n: base[n].expand(input_ids.shape[0], *base[n].shape) for n in names}
    for _ in range(n_steps if span > 1 else 0):
        leaves = {n: t.detach().requires_grad_(True) for n, t in current.items()}
        weights = {**base, **leaves}
        with torch.enable_grad():
            y = run(grad_sim, weights, input_ids[:, :span], None if bottom is None else bottom[:, :span])
            loss = grad_sim.training_loss(y, input_ids[:, :span], output_embedding(spec, weights))
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for (n, t), g in zip(list(current.items()), grads):
            if g is not None:
                if approx.authors_fc2_bias_bug and n.endswith("fc2.bias"):
                    g = g * (spec.ffn_dim / spec.hidden_size)
                current[n] = torch.add(t.detach(), g, alpha=-lr)
    with torch.no_grad():
        weights = {**base, **current}
        logits_after = full.logits(run(full, weights, input_ids, bottom), weights)
    params = to_hf_parameters(model, current) if return_params else None
    return summarize(logits_before, logits_after, input_ids, masks, params)
