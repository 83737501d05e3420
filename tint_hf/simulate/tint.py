"""``tint_step``: the approximate SGD step that TinT simulates, as a reference (oracle) independent of TinT's code.

It runs the auxiliary Hugging Face model itself (its own modules and parameters, its rotary embedding, its norms)
with ``torch.func.functional_call`` and per-sequence parameters, and while it differentiates the training loss it
applies TinT's approximations (``tint.md`` §3.2) as local rules on those modules (:mod:`.families` says where):

* ``stop_attention_grad``: no gradient through the attention probabilities; only the value path
  ``dv_i = sum_j A_ji dout_j`` survives, so ``W_Q, W_K`` get no gradient and lower layers see only ``W_V^T dv``.
* ``train_token_mask``: TinT's descent sums ``dy_t x_t^T`` over *training-part* tokens only, and its value-path
  backward lets query j pass gradient to earlier keys only if j is in the training part. Both are exact when the
  training part is a prefix of the sequence (the usual case) and matter only for interleaved masks.
* ``freeze_qk``: ``W_Q, b_Q, W_K, b_K`` are not updated.
* ``ln_bias_only``: norm gains are frozen, only LayerNorm biases are updated.
* ``freeze_embeddings``: token/position embeddings and the LM head are not updated.
* ``backward="fd"``: the norms' normalisation and the activation are differentiated by TinT's finite difference
  ``dx = N * (f(x + g/N) - f(x))`` with ``N = fd_scale`` (``"exact"`` uses the true VJP); ``f`` is the HF module
  itself (a norm with unit gain and zero bias).
* ``loss_gradient``: ``"ce"`` (exact cross-entropy gradient), ``"quad"`` (``U^T(U y) - U_target``) or
  ``"uniform"`` (``mean_v U_v - U_target``), the gradient TinT injects at the final-norm output ``y``.
* ``authors_fc2_bias_bug``: the authors' code gives the fc2 bias ``d_ff/d`` times the step (off by default).

Only the top ``num_layers`` layers (and the final norm) are updated. Nothing here comes from
``tint_hf.models.tint``: a bug in TinT's weight layout, rotary embedding or target convention shows up as a
disagreement between TinT and this reference.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .exact import _eval_mode, _validate_step_args, forward_with_params
from .families import Family, family_of
from .masks import TargetMasks, build_target_masks, gradient_span, next_token_nll
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
        if isinstance(self.fd_scale, bool) or not isinstance(self.fd_scale, (int, float)) or not (
                math.isfinite(self.fd_scale) and self.fd_scale > 0):
            raise ValueError(f"fd_scale={self.fd_scale!r} must be a finite positive number.")

    @classmethod
    def none(cls) -> Approximations:
        """No approximation at all: ``tint_step`` then equals ``exact_step`` on all parameters."""
        return cls(stop_attention_grad=False, train_token_mask=False, freeze_qk=False, ln_bias_only=False,
                   freeze_embeddings=False, backward="exact")

    def with_(self, **changes) -> Approximations:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------------------------------------------
# The rules, as autograd surrogates: each returns the module's own output value, with TinT's gradient.
# --------------------------------------------------------------------------------------------------------------
class _FiniteDifference(torch.autograd.Function):
    """Forward 0; backward ``dx = N (f(x + g'/N) - f(x))`` with ``g' = gain * g`` (TinT's first-order Jacobian).

    The difference cancels about log10(N) digits: bfloat16 / float16 inputs are evaluated in float32 (in bfloat16,
    x + g/N mostly rounds back to x and the gradient would be noise)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable, gain: torch.Tensor | None, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, gain)
        ctx.fn, ctx.scale = fn, scale
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, gain = ctx.saved_tensors
        wide = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
        x_, g = x.to(wide), grad.to(wide)
        if gain is not None:
            g = g * gain.to(wide)
        return (ctx.scale * (ctx.fn(x_ + g / ctx.scale) - ctx.fn(x_))).to(grad.dtype), None, None, None


def _module_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: getattr(module, name) for name in ("weight", "bias") if getattr(module, name, None) is not None}


@dataclass
class _Rules:
    """Forward hooks applying TinT's rules in one gradient pass: the switches, the rows that train, and the queries
    of the training part (for the attention's own-value-only rule when the training part has holes).

    Each hook re-runs its module functionally (with some parameters held fixed) and returns the module's own output
    value with TinT's gradient; ``busy`` keeps those inner calls from triggering the hook again."""

    approx: Approximations
    rows: torch.Tensor | None          # (B, T, 1) float, or None: descent over every row
    train_queries: torch.Tensor | None  # (B, T) bool, or None: plain value path
    busy: bool = False

    def _run(self, module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        self.busy = True
        try:
            return functional_call(module, params, (x,))
        finally:
            self.busy = False

    def _parameter_path(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The module's output, differentiable in its parameters only, with gradient from ``rows`` only."""
        value = self._run(module, _module_params(module), x.detach())
        return value if self.rows is None else self.rows * value + (1 - self.rows) * value.detach()

    def _input_path(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """0 forward; the module's exact input VJP backward (its parameters held fixed)."""
        y = self._run(module, {name: p.detach() for name, p in _module_params(module).items()}, x)
        return y - y.detach()

    def linear(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Descent over training-part rows only: the module's own output, minus the parameter gradient of the rows
        outside ``rows`` (one extra product); the input gradient is untouched."""
        if self.busy:
            return None
        weights_only = self._run(module, _module_params(module), args[0].detach())
        return output - (1 - self.rows) * (weights_only - weights_only.detach())

    def norm(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Gain / bias gradients (from ``rows``) exact; the input gradient of the normalisation by TinT's finite
        difference of the module with unit gain and zero bias, or exactly."""
        if self.busy:
            return None
        x = args[0]
        value = self._parameter_path(module, x)
        if self.approx.backward == "exact":
            return value + self._input_path(module, x)
        params = _module_params(module)
        unit = {name: (torch.ones_like(p) if name == "weight" else torch.zeros_like(p)).detach()
                for name, p in params.items()}

        def normalize(z: torch.Tensor) -> torch.Tensor:
            return self._run(module, {name: p.to(z.dtype) for name, p in unit.items()}, z)

        gain = params["weight"].detach() if "weight" in params else None
        return value + _FiniteDifference.apply(x, normalize, gain, self.approx.fd_scale)

    def activation(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.busy:
            return None
        return output.detach() + _FiniteDifference.apply(args[0], module, None, self.approx.fd_scale)


_ACTIVE: ContextVar[_Rules | None] = ContextVar("tint_hf_reference_rules", default=None)
VALUE_PATH_ATTENTION = "tint_hf_value_path"


def _value_path_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (an ``AttentionInterface`` function) whose probabilities carry no gradient.

    query (B, h, T, dh), key / value (B, h_kv, T, dh) (grouped heads are repeated); attention_mask: HF's boolean
    (B, 1, T, T) mask, an additive float mask, or None (causal). Returns the output (B, T, h, dh) and the
    probabilities. With ``train_queries`` set, a query outside the training part passes gradient to its own value
    only (TinT's mask M)."""
    rules = _ACTIVE.get()
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query.detach() @ key.detach().transpose(-1, -2)) * scale
    if attention_mask is None:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    probs = scores.softmax(-1).to(value.dtype)
    out = probs @ value
    if rules is not None and rules.train_queries is not None:
        own = out.detach() + probs.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * (value - value.detach())
        out = torch.where(rules.train_queries[:, None, :, None], out, own)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(VALUE_PATH_ATTENTION, _value_path_attention)
AttentionMaskInterface.register(VALUE_PATH_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _tint_rules(model: nn.Module, family: Family, rules: _Rules, first_layer: int) -> Iterator[None]:
    """Apply ``rules`` to the updated layers (and the final norm) while the context is open."""
    approx = rules.approx
    layers = model.get_submodule(family.layers)
    hooks = []
    for layer in layers[first_layer:]:  # (each layer owns its modules: no module is hooked twice)
        for path in family.norms:
            hooks.append(layer.get_submodule(path).register_forward_hook(rules.norm))
        if approx.backward == "fd":
            hooks.append(layer.get_submodule(family.activation).register_forward_hook(rules.activation))
        if rules.rows is not None:
            for path in family.linears:
                hooks.append(layer.get_submodule(path).register_forward_hook(rules.linear))
    hooks.append(model.get_submodule(family.final_norm).register_forward_hook(rules.norm))
    implementation = model.config._attn_implementation
    token = _ACTIVE.set(rules)
    try:
        if approx.stop_attention_grad:
            model.config._attn_implementation = VALUE_PATH_ATTENTION
        yield
    finally:
        model.config._attn_implementation = implementation
        _ACTIVE.reset(token)
        for hook in hooks:
            hook.remove()


# --------------------------------------------------------------------------------------------------------------
# Which parameters move, and how their gradients are shaped
# --------------------------------------------------------------------------------------------------------------
def _check_num_layers(model: nn.Module, family: Family, num_layers: int | None) -> int:
    depth = len(model.get_submodule(family.layers))
    num_layers = depth if num_layers is None else num_layers
    if not 1 <= num_layers <= depth:
        raise ValueError(f"num_layers={num_layers} must be between 1 and the auxiliary depth ({depth}).")
    return depth - num_layers


def trainable_names(model: nn.Module, approx: Approximations, num_layers: int | None = None) -> list[str]:
    """HF names of the parameters TinT's step updates: the top ``num_layers`` layers (without Q/K when
    ``freeze_qk``, without norm gains when ``ln_bias_only``), the final norm, and the embeddings unless frozen."""
    family = family_of(model)
    first = _check_num_layers(model, family, num_layers)
    layers = model.get_submodule(family.layers)
    frozen_modules = set(family.queries_keys) if approx.freeze_qk else set()
    names = []
    for i in range(first, len(layers)):
        for path in family.norms + family.linears:
            if path in frozen_modules:
                continue
            for kind in _module_params(layers[i].get_submodule(path)):
                if approx.ln_bias_only and path in family.norms and kind == "weight":
                    continue
                names.append(f"{family.layers}.{i}.{path}.{kind}")
    for kind in _module_params(model.get_submodule(family.final_norm)):
        if not (approx.ln_bias_only and kind == "weight"):
            names.append(f"{family.final_norm}.{kind}")
    if not approx.freeze_embeddings:
        own = dict(model.named_parameters())  # de-duplicated: a tied LM head is the embedding
        names += [name for name in family.embeddings if name in own]
        head = next(name for name, p in model.named_parameters(remove_duplicate=False)
                    if p is model.get_output_embeddings().weight)
        names += [head] if head in own and head not in names else []
    return names


def _gradient_rules(model: nn.Module, family: Family, approx: Approximations,
                    names: list[str]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Per-parameter changes of the raw gradient: GPT-2's fused ``c_attn`` loses its Q/K columns under
    ``freeze_qk``; the MLP output bias gets ``d_ff / d`` times its gradient under ``authors_fc2_bias_bug``."""
    rules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    d = model.config.hidden_size
    for name in names:
        module_path, _, kind = name.rpartition(".")
        if approx.freeze_qk and family.fused_qkv and module_path.endswith(f".{family.fused_qkv}"):
            def drop_qk(g: torch.Tensor) -> torch.Tensor:  # Conv1D: weight (d, 3d) and bias (3d), columns [q|k|v]
                g = g.clone()
                g[..., : 2 * d] = 0
                return g
            rules[name] = drop_qk
        if approx.authors_fc2_bias_bug and kind == "bias" and module_path.endswith(f".{family.mlp_out}"):
            ratio = model.get_submodule(module_path).weight.numel() / (d * d)  # d_ff / d
            rules[name] = lambda g, ratio=ratio: g * ratio
    return rules


def _training_loss(approx: Approximations, logits: torch.Tensor, y: torch.Tensor, head: torch.Tensor,
                   input_ids: torch.Tensor, masks: TargetMasks) -> torch.Tensor:
    """Summed loss over training targets whose gradient w.r.t. the final-norm output y (B, T, d) is the one TinT
    injects; ``head`` is the LM head matrix U (V, d)."""
    if approx.loss_gradient == "ce":
        return (next_token_nll(logits, input_ids) * masks.train).sum()
    b, t = masks.train.nonzero(as_tuple=True)
    y_n, target_rows = y[b, t], head[input_ids[b, t + 1]]                 # (N, d), U_target (N, d)
    if approx.loss_gradient == "quad":                                    # grad = U^T (U y) - U_target
        return (0.5 * (y_n @ head.T).pow(2).sum(-1) - (target_rows * y_n).sum(-1)).sum()
    return ((head.mean(0) - target_rows) * y_n).sum()                      # grad = mean_v U_v - U_target


def _row_key(input_ids: torch.Tensor, masks: TargetMasks, b: int, span: int) -> tuple:
    """Everything the step of row ``b`` depends on (its first ``span`` positions): rows with equal keys share it."""
    parts = [input_ids[b, :span], masks.train_tokens[b, :span], masks.attention_mask[b, :span],
             masks.train[b, : span - 1], masks.position_ids[b, :span]]
    return tuple(tuple(p.tolist()) for p in parts)


def tint_step(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              train_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, *, lr: float, num_steps: int = 1, num_layers: int | None = None,
              approximations: Approximations | None = None, return_params: bool = False) -> SimulationOutput:
    """The approximate SGD step TinT simulates, per sequence, then the prediction with the updated weights.

    Same inputs and output as :func:`tint_hf.simulate.exact_step`; ``approximations`` selects TinT's departures
    from exact SGD (default: TinT's setting). Supports OPT (pre-LN), GPT-2 and Llama models.
    """
    _validate_step_args(lr, num_steps)
    approx = approximations or Approximations()
    family = family_of(model)
    masks = build_target_masks(input_ids, attention_mask, train_mask, loss_mask, position_ids)
    first = _check_num_layers(model, family, num_layers)
    names = trainable_names(model, approx, num_layers)
    gradient_rules = _gradient_rules(model, family, approx, names)
    own = dict(model.named_parameters())
    head = model.get_output_embeddings().weight
    head_name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is head)
    head_name = head_name if head_name in own else family.embeddings[0]  # tied: the embedding is the head

    steps: dict[tuple, dict[str, torch.Tensor]] = {}
    updated = []
    with _eval_mode(model):
        for b in range(input_ids.shape[0]):
            span = gradient_span(masks.row(b))
            key = _row_key(input_ids, masks, b, span)
            if key not in steps:
                steps[key] = _descend_row(model, family, approx, names, gradient_rules, head_name, first,
                                          input_ids[b:b + 1, :span], masks.row(b).first(span), lr,
                                          num_steps if span > 1 else 0)
            updated.append(steps[key])
        stacked = {n: torch.stack([row[n] for row in updated]) for n in names}
        with torch.no_grad():
            logits_before = forward_with_params(model, {}, input_ids, masks.attention_mask, masks.position_ids)
            logits_after = forward_with_params(model, stacked, input_ids, masks.attention_mask, masks.position_ids)
    return summarize(logits_before, logits_after, input_ids, masks, stacked if return_params else None)


def _descend_row(model: nn.Module, family: Family, approx: Approximations, names: list[str],
                 gradient_rules: dict[str, Callable], head_name: str, first_layer: int, input_ids: torch.Tensor,
                 masks: TargetMasks, lr: float, num_steps: int) -> dict[str, torch.Tensor]:
    """``num_steps`` of TinT's step on one sequence (1, span): the updated parameters (their own shapes)."""
    own = {n: p.detach() for n, p in model.named_parameters()}
    current = {n: own[n] for n in names}
    holes = bool((masks.attention_mask & ~masks.train_tokens).any())
    rules = _Rules(approx, rows=masks.train_tokens[..., None].to(own[names[0]].dtype) if approx.train_token_mask
                   else None, train_queries=masks.train_tokens if approx.train_token_mask and holes else None)
    final_outputs: list[torch.Tensor] = []  # the LM head's input: the final-norm output y
    capture = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: final_outputs.append(args[0]))
    try:
        for _ in range(num_steps):
            leaves = {n: t.clone().requires_grad_(True) for n, t in current.items()}
            with torch.enable_grad(), _tint_rules(model, family, rules, first_layer):
                logits = functional_call(model, {**own, **leaves}, args=(input_ids,), tie_weights=True, kwargs=dict(
                    attention_mask=masks.attention_mask.long(), position_ids=masks.position_ids, use_cache=False)).logits
                head = leaves.get(head_name, own[head_name])
                loss = _training_loss(approx, logits, final_outputs.pop(), head, input_ids, masks)
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for (name, value), grad in zip(leaves.items(), grads):
                if grad is not None:
                    grad = gradient_rules.get(name, lambda g: g)(grad)
                    current[name] = value.detach() - lr * grad
    finally:
        capture.remove()
    return current


__all__ = ["Approximations", "tint_step", "trainable_names"]
