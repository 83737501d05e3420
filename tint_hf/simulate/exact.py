"""True dynamic evaluation: a real SGD step with torch autograd, for any HF causal LM.

For every sequence b (independently, unless ``per_sequence=False``):

    theta_b   = theta - lr * grad_theta  sum_{t in train targets of b}  -log p_theta(x_{t+1} | x_{<=t})
    logits_b  = f(x_b; theta_b)

repeated ``num_steps`` times, on the parameter subset ``params`` (default: the top ``num_layers`` decoder layers
and the final norm). The model passed in is never modified; it runs in eval mode (no dropout).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .masks import TargetMasks, build_target_masks, next_token_nll
from .outputs import SimulationOutput, summarize


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the one whose length is ``num_hidden_layers``."""
    text_config = model.config.get_text_config()
    n = getattr(text_config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"Could not find the decoder layers of {type(model).__name__} (an nn.ModuleList of "
                     f"num_hidden_layers={n} blocks). Pass the parameter names to update explicitly via `params=`.")


def select_parameters(model: nn.Module, num_layers: int | None = None, include_embeddings: bool = False) -> list[str]:
    """Names of the parameters one inner step updates.

    Default: every parameter of the top ``num_layers`` decoder layers (all layers if None) plus the final norm.
    Embeddings (token and position) and the LM head are included only with ``include_embeddings=True``.
    """
    layers_name, layers = _decoder_layers(model)
    total = len(layers)
    num_layers = total if num_layers is None else num_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers={num_layers} must be between 1 and the number of decoder layers ({total}).")
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    output = model.get_output_embeddings()
    if output is not None:
        embedding_params |= {id(p) for p in output.parameters()}
    selected = [f"{layers_name}.{i}.{n}" for i in range(total - num_layers, total) for n, _ in layers[i].named_parameters()]
    for name, p in model.named_parameters():  # de-duplicated: a tied LM head appears once
        if name.startswith(f"{layers_name}."):
            continue
        is_embedding = id(p) in embedding_params
        owner = model.get_submodule(name.rpartition(".")[0])
        if (is_embedding and include_embeddings) or (not is_embedding and "norm" in type(owner).__name__.lower()):
            selected.append(name)
    return selected


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (dropout off) and restore every module's training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _accepts_position_ids(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def forward_with_params(model: nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) of ``model`` with some parameters replaced.

    ``params`` maps parameter names to tensors that are either shared by the batch (the parameter's own shape)
    or per sequence (a leading batch dimension B). Parameters not in ``params`` are the model's own.
    """
    masks = build_target_masks(input_ids, attention_mask, torch.ones_like(input_ids), position_ids=position_ids)
    with _eval_mode(model):
        return _forward(model, params, input_ids, masks)


def _forward(model: nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor,
             masks: TargetMasks) -> torch.Tensor:
    """Logits with ``params`` replacing the model's own; per-sequence params (leading B dim) run row by row."""
    own = dict(model.named_parameters())
    unknown = set(params) - set(own)
    if unknown:
        raise KeyError(f"Unknown parameter names for {type(model).__name__}: {sorted(unknown)[:5]}.")
    frozen = {n: p.detach() for n, p in own.items() if n not in params}
    per_sequence = {n for n, t in params.items() if t.dim() == own[n].dim() + 1}
    if not per_sequence:
        return _call(model, {**frozen, **params}, input_ids, masks.attention_mask, masks.position_ids)
    rows = []
    for b in range(input_ids.shape[0]):
        row_params = {n: (t[b] if n in per_sequence else t) for n, t in params.items()}
        rows.append(_call(model, {**frozen, **row_params}, input_ids[b:b + 1], masks.attention_mask[b:b + 1],
                          masks.position_ids[b:b + 1]))
    return torch.cat(rows, dim=0)


def _call(model: nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
          position_ids: torch.Tensor) -> torch.Tensor:
    kwargs = {"attention_mask": attention_mask.long(), "use_cache": False}
    if _accepts_position_ids(model):
        kwargs["position_ids"] = position_ids
    return functional_call(model, params, args=(input_ids,), kwargs=kwargs, tie_weights=True).logits


def _resolve_params(model: nn.Module, params: Sequence[str] | None, num_layers: int | None) -> list[str]:
    names = list(params) if params is not None else select_parameters(model, num_layers)
    own = dict(model.named_parameters())
    missing = [n for n in names if n not in own]
    if missing:
        raise KeyError(f"{type(model).__name__} has no parameters named {missing[:5]}; "
                       f"see `dict(model.named_parameters())` or `tint_hf.simulate.select_parameters`.")
    return names


def _descend(model: nn.Module, names: list[str], input_ids: torch.Tensor, masks: TargetMasks, lr: float,
             num_steps: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``num_steps`` SGD steps on the summed training loss of all rows of ``input_ids`` (one shared update).

    Returns the updated parameters and the logits before the first step.
    """
    own = dict(model.named_parameters())
    current = {n: own[n].detach() for n in names}
    first_logits = None
    for _ in range(num_steps):
        leaves = {n: t.clone().requires_grad_(True) for n, t in current.items()}
        with torch.enable_grad():
            logits = _forward(model, leaves, input_ids, masks)
            loss = (next_token_nll(logits, input_ids) * masks.train).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        if first_logits is None:
            first_logits = logits.detach()
        current = {n: (t if g is None else t - lr * g) for (n, t), g in zip(current.items(), grads)}
    return current, first_logits


def _validate_step_args(lr: float, num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an int >= 1.")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a float, got {type(lr).__name__}.")
    if not math.isfinite(lr):
        raise ValueError(f"lr={lr} must be finite.")


def sgd_update(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               train_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, *, lr: float, num_steps: int = 1, num_layers: int | None = None,
               params: Sequence[str] | None = None, per_sequence: bool = True) -> dict[str, torch.Tensor]:
    """Parameters after ``num_steps`` SGD steps on the summed training-target loss.

    With ``per_sequence=True`` every row gets its own step and the tensors have a leading batch dimension B;
    with ``per_sequence=False`` one step is taken on the loss summed over all rows (e.g. one demonstration per row)
    and the tensors have the parameters' own shapes. Feed the result to :func:`forward_with_params`.
    """
    _validate_step_args(lr, num_steps)
    masks = build_target_masks(input_ids, attention_mask, train_mask, loss_mask, position_ids)
    names = _resolve_params(model, params, num_layers)
    with _eval_mode(model):
        if not per_sequence:
            return _descend(model, names, input_ids, masks, lr, num_steps)[0]
        rows = [_descend(model, names, input_ids[b:b + 1], masks.row(b), lr, num_steps)[0]
                for b in range(input_ids.shape[0])]
    return {n: torch.stack([r[n] for r in rows]) for n in names}


def exact_step(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               train_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, *, lr: float, num_steps: int = 1, num_layers: int | None = None,
               params: Sequence[str] | None = None, return_params: bool = False) -> SimulationOutput:
    """True dynamic evaluation of any HF causal LM: per-sequence SGD on the training part, then predict.

    Args:
        model: any ``*ForCausalLM``; never modified.
        input_ids, attention_mask, train_mask, loss_mask, position_ids: (B, T); see :mod:`tint_hf.simulate.masks`.
        lr: learning rate of the step on the **summed** loss.
        num_steps: number of SGD steps (each recomputes the gradient with the updated weights).
        num_layers: update the top ``num_layers`` decoder layers (+ final norm); None = all layers.
        params: explicit parameter names to update (overrides ``num_layers``).
        return_params: include the updated parameters (leading batch dim) in the output.
    """
    _validate_step_args(lr, num_steps)
    masks = build_target_masks(input_ids, attention_mask, train_mask, loss_mask, position_ids)
    names = _resolve_params(model, params, num_layers)
    updated, before, after = [], [], []
    with _eval_mode(model):
        for b in range(input_ids.shape[0]):
            row_ids, row_masks = input_ids[b:b + 1], masks.row(b)
            new_params, logits_before = _descend(model, names, row_ids, row_masks, lr, num_steps)
            with torch.no_grad():
                after.append(_forward(model, new_params, row_ids, row_masks))
            before.append(logits_before)
            updated.append(new_params)
    stacked = {n: torch.stack([u[n] for u in updated]) for n in names} if return_params else None
    return summarize(torch.cat(before), torch.cat(after), input_ids, masks, stacked)
