"""Small sequence models for the synthetic tasks: one linear self-attention layer, and OPT-shaped softmax or mesa
transformers (HF ``OPTModel`` / :class:`~tint_hf.MesaOPTModel` on ``inputs_embeds``) between a linear read-in and
read-out. All take the task fields of :mod:`tint_hf.synthetic.tasks` and return a :class:`SyntheticOutput`, so the
HF ``Trainer`` trains them as they are."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import OPTConfig, OPTModel
from transformers.utils import ModelOutput

from ..models.mesa import MesaOPTConfig, MesaOPTModel
from .tasks import SyntheticTask

BACKBONES = ("softmax", "mesa", "lsa")


@dataclass
class SyntheticOutput(ModelOutput):
    """loss: scalar (when targets are given); predictions: (B, T, d_out) values or class logits;
    hidden_states: (B, T, hidden) the representation the read-out sees."""

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


def task_loss(predictions: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor, regression: bool
              ) -> torch.Tensor:
    """Mean squared error per masked element (regression; predictions and targets (B, T, d)) or mean cross-entropy
    over masked tokens (classification; logits (B, T, C), targets (B, T))."""
    mask = target_mask.to(predictions.dtype)
    if mask.sum() == 0:
        raise ValueError("target_mask selects no position: nothing to take the loss on.")
    if regression:
        squared = (predictions - targets.to(predictions.dtype)).pow(2).mean(-1)
        return (squared * mask).sum() / mask.sum()
    labels = targets.masked_fill(mask == 0, -100)
    return F.cross_entropy(predictions.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _check_inputs(inputs: torch.Tensor, width: int) -> None:
    if inputs.dim() != 3 or inputs.shape[-1] != width:
        raise ValueError(f"inputs must be (batch, length, {width}), got shape {tuple(inputs.shape)}.")


class LinearSelfAttentionModel(nn.Module):
    r"""One linear self-attention layer (von Oswald et al. 2023), read out at the label coordinates of each token.

    Tokens ``e_j`` (token_dim = d_x + d_out, labels last). Each head h computes, causally over the earlier tokens,
    ``delta_j = (1/j) sum_{i<j} (W_V^h e_i)(W_K^h e_i)^T (W_Q^h e_j)`` (no softmax), the heads are projected back by
    ``P``, and the prediction for token j is the label part of ``e_j + P [delta_j^1 .. delta_j^H]``.

    With ``W_Q = W_K = [[I, 0], [0, 0]]``, ``W_V = [[0, 0], [0, I]]`` and ``P = eta I`` this is exactly one gradient
    step from ``W = 0`` with learning rate ``eta`` on ``L(W) = 1/(2j) sum_i |W x_i - y_i|^2``, predicting ``W_1 x_j``.
    """

    def __init__(self, token_dim: int, d_out: int = 1, num_heads: int = 1, init_std: float | None = None):
        super().__init__()
        if not 0 < d_out < token_dim:
            raise ValueError(f"d_out must lie in (0, token_dim={token_dim}), got {d_out}.")
        self.token_dim, self.d_out, self.num_heads = token_dim, d_out, num_heads
        width = num_heads * token_dim
        self.q_proj = nn.Linear(token_dim, width, bias=False)
        self.k_proj = nn.Linear(token_dim, width, bias=False)
        self.v_proj = nn.Linear(token_dim, width, bias=False)
        self.out_proj = nn.Linear(width, token_dim, bias=False)
        std = init_std if init_std is not None else 1.0 / math.sqrt(token_dim)
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.normal_(linear.weight, std=std)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                target_mask: torch.Tensor | None = None) -> SyntheticOutput:
        """inputs (B, T, token_dim); targets (B, T, d_out); target_mask (B, T)."""
        _check_inputs(inputs, self.token_dim)
        bsz, length, _ = inputs.shape
        heads = (bsz, length, self.num_heads, self.token_dim)
        q, k, v = (proj(inputs).view(heads).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        scores = q @ k.mT  # (B, H, T, T): scores[..., j, i] = k_i . q_j
        earlier = torch.ones(length, length, dtype=torch.bool, device=inputs.device).tril(-1)
        counts = torch.arange(length, device=inputs.device).clamp(min=1).to(inputs.dtype)  # j tokens before token j
        delta = (scores.masked_fill(~earlier, 0.0) @ v) / counts[:, None]  # (B, H, T, token_dim)
        hidden = inputs + self.out_proj(delta.transpose(1, 2).reshape(bsz, length, -1))
        predictions = hidden[..., -self.d_out :]
        loss = None if targets is None else task_loss(predictions, targets, target_mask, regression=True)
        return SyntheticOutput(loss=loss, predictions=predictions, hidden_states=hidden)


class SequenceModel(nn.Module):
    """``read_in`` (d_in -> hidden) -> an OPT-shaped decoder (softmax: HF ``OPTModel``; mesa: ``MesaOPTModel``) ->
    ``read_out`` (hidden -> d_out values or class logits). ``weights_head`` (optional, hidden -> num_values) predicts a
    context-free target for the auxiliary weights loss ``loss + weights_loss * CE(weights_head(h), values)``."""

    def __init__(self, d_in: int, d_out: int, backbone: OPTConfig, regression: bool, num_values: int | None = None,
                 weights_loss: float = 0.0):
        super().__init__()
        if weights_loss < 0 or (weights_loss > 0 and not num_values):
            raise ValueError("weights_loss must be >= 0, and > 0 only with num_values (a context-free target).")
        self.d_in, self.regression, self.weights_loss = d_in, regression, weights_loss
        width = backbone.word_embed_proj_dim
        self.read_in = nn.Linear(d_in, width)
        self.backbone = (MesaOPTModel if isinstance(backbone, MesaOPTConfig) else OPTModel)(backbone)
        self.read_out = nn.Linear(width, d_out)
        self.weights_head = nn.Linear(width, num_values) if weights_loss > 0 else None

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                target_mask: torch.Tensor | None = None, values: torch.Tensor | None = None) -> SyntheticOutput:
        """inputs (B, T, d_in); targets (B, T, d_out) or (B, T) class ids; target_mask (B, T); values (B, T) class
        ids of the context-free target (-100 where none), for the weights loss: needed with targets exactly when the
        model has one."""
        _check_inputs(inputs, self.d_in)
        if values is not None and self.weights_head is None:
            raise ValueError("values (the context-free target) is only used by a model built with weights_loss > 0.")
        if targets is not None and self.weights_head is not None and values is None:
            raise ValueError("This model has a weights loss: pass values (the context-free target) with targets.")
        hidden = self.backbone(inputs_embeds=self.read_in(inputs), use_cache=False).last_hidden_state
        predictions = self.read_out(hidden)
        loss = None
        if targets is not None:
            loss = task_loss(predictions, targets, target_mask, self.regression)
            if self.weights_head is not None:
                aux = F.cross_entropy(self.weights_head(hidden).flatten(0, 1), values.flatten(), ignore_index=-100)
                loss = loss + self.weights_loss * aux
        return SyntheticOutput(loss=loss, predictions=predictions, hidden_states=hidden)


def build_model(task: SyntheticTask, backbone: str = "softmax", hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, mesa_layers: list[int] | str = "all", mesa_solver: str = "cg", cg_steps: int = 30,
                weights_loss: float = 0.0) -> nn.Module:
    """A model for ``task``: ``backbone`` is ``"softmax"`` (OPT), ``"mesa"`` (MesaOPT with ``mesa_layers``) or
    ``"lsa"`` (one linear self-attention layer; regression tasks whose tokens end in their labels)."""
    sample = task.batch(1, seed=0)
    d_in = sample["inputs"].shape[-1]
    if backbone == "lsa":
        if not task.is_regression:
            raise ValueError("backbone='lsa' reads its prediction from the label coordinates: regression tasks only.")
        return LinearSelfAttentionModel(d_in, d_out=sample["targets"].shape[-1], num_heads=1)
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}.")
    length = sample["inputs"].shape[1]
    fields = dict(vocab_size=4, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  ffn_dim=4 * hidden_size, max_position_embeddings=length, dropout=0.0, attention_dropout=0.0,
                  word_embed_proj_dim=hidden_size, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    config = (MesaOPTConfig(mesa_layers=mesa_layers, mesa_solver=mesa_solver, cg_steps=cg_steps, **fields) if backbone == "mesa"
              else OPTConfig(**fields))
    d_out = sample["targets"].shape[-1] if task.is_regression else task.num_values
    return SequenceModel(d_in, d_out, config, task.is_regression, getattr(task, "num_values", None), weights_loss)


@contextlib.contextmanager
def self_only_mixing(model: SequenceModel) -> Iterator[None]:
    """Within the block, every token mixer of ``model`` (softmax or mesa) outputs ``out_proj(v_proj(x_t))``: the
    attention matrix replaced by the identity, so each token sees only itself and the representation is what the
    weights compute from the token alone (the weights component of Fu et al.)."""

    def self_only(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (module.out_proj(module.v_proj(hidden)),) + tuple(output[1:])

    mixers = [m for name, m in model.backbone.named_modules() if name.endswith("self_attn")]
    if not mixers:
        raise ValueError("self_only_mixing needs a SequenceModel with attention layers named self_attn.")
    handles = [m.register_forward_hook(self_only, with_kwargs=True) for m in mixers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["BACKBONES", "LinearSelfAttentionModel", "SequenceModel", "SyntheticOutput", "build_model",
           "self_only_mixing", "task_loss"]
