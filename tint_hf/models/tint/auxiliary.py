"""Canonical view of a supported auxiliary (simulated) language model.

TinT and the reference simulator both work on one family-independent description of a pre-LayerNorm decoder:

    h_0   = E[x_t] + P[pos_t + offset]                                  (token + learned position embedding)
    per layer i:
      u   = LN1(h)                 q, k, v = u W_q^T + b_q, u W_k^T + b_k, u W_v^T + b_v
      h   = h + Attn(q, k, v) W_o^T + b_o                                (causal softmax attention, `num_heads` heads)
      z   = LN2(h) W_1^T + b_1     h = h + act(z) W_2^T + b_2
    logits = LN_f(h) U^T                                                 (U = lm_head weight, usually tied to E)

Weights are kept in a flat ``dict[str, Tensor]`` with the names below (all linear weights in ``nn.Linear``
layout ``(out, in)``); a per-sequence copy of a weight simply carries a leading batch dimension.

    embed_tokens (V, d)   embed_positions (T_max + offset, d)   final_norm.weight / .bias (d)
    lm_head (V, d)        (absent when tied to embed_tokens: ``spec.tied_embeddings``)
    layers.{i}.{ln1, ln2}.{weight, bias} (d)      layers.{i}.{q, k, v, o}.{weight (d, d), bias (d)}
    layers.{i}.fc1.{weight (d_ff, d), bias (d_ff)} layers.{i}.fc2.{weight (d, d_ff), bias (d)}

Supported families: OPT (pre-LN, ``word_embed_proj_dim == hidden_size``) and GPT-2. This module imports only
torch and transformers, so it can ship as remote code next to ``modeling_tint.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LAYER_KEYS: tuple[str, ...] = tuple(
    f"{module}.{kind}"
    for module in ("ln1", "q", "k", "v", "o", "ln2", "fc1", "fc2")
    for kind in ("weight", "bias")
)
SUPPORTED_FAMILIES = ("opt", "gpt2")


class UnsupportedAuxiliaryModelError(ValueError):
    """The auxiliary model's architecture cannot be simulated by TinT / ``tint_step``."""


@dataclass(frozen=True)
class AuxiliarySpec:
    """Shape and numerics of the auxiliary model, everything the simulation needs besides the weights."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_dim: int
    vocab_size: int
    max_positions: int
    position_offset: int
    activation: str
    layer_norm_eps: float
    attention_scale: float
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def layer_key(layer: int, key: str) -> str:
    return f"layers.{layer}.{key}"


def _require(condition: bool, family: str, problem: str, fix: str) -> None:
    if not condition:
        raise UnsupportedAuxiliaryModelError(
            f"Unsupported {family} auxiliary model: {problem}. {fix} "
            f"TinT and tint_step support these families: {', '.join(SUPPORTED_FAMILIES)} (pre-LayerNorm)."
        )


def auxiliary_spec(config) -> AuxiliarySpec:
    """Validate an auxiliary config and describe it; raises :class:`UnsupportedAuxiliaryModelError` otherwise."""
    family = getattr(config, "model_type", None)
    if family == "opt":
        _require(config.do_layer_norm_before, "opt", "it is post-LayerNorm (do_layer_norm_before=False, e.g. OPT-350M)",
                 "Use a pre-LN OPT such as facebook/opt-125m or opt-1.3b.")
        _require(config.word_embed_proj_dim == config.hidden_size, "opt",
                 f"word_embed_proj_dim={config.word_embed_proj_dim} != hidden_size={config.hidden_size} "
                 "(project_in/project_out layers)", "Use an OPT whose embeddings have the model width.")
        _require(not getattr(config, "_remove_final_layer_norm", False), "opt", "it has no final LayerNorm",
                 "Use a standard OPT checkpoint.")
        _require(getattr(config, "enable_bias", True) and getattr(config, "layer_norm_elementwise_affine", True),
                 "opt", "it has no linear biases or no LayerNorm affine parameters", "Use a standard OPT checkpoint.")
        head_dim = config.hidden_size // config.num_attention_heads
        return AuxiliarySpec(
            family="opt", num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads, ffn_dim=config.ffn_dim, vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings, position_offset=2,
            activation=config.activation_function, layer_norm_eps=1e-5, attention_scale=head_dim**-0.5,
            tied_embeddings=config.tie_word_embeddings,
        )
    if family == "gpt2":
        _require(not config.add_cross_attention, "gpt2", "it has cross-attention", "Use a decoder-only GPT-2.")
        _require(not config.scale_attn_by_inverse_layer_idx, "gpt2", "scale_attn_by_inverse_layer_idx=True",
                 "Use a GPT-2 with the standard attention scaling.")
        head_dim = config.n_embd // config.n_head
        return AuxiliarySpec(
            family="gpt2", num_layers=config.n_layer, hidden_size=config.n_embd, num_heads=config.n_head,
            ffn_dim=config.n_inner or 4 * config.n_embd, vocab_size=config.vocab_size,
            max_positions=config.n_positions, position_offset=0, activation=config.activation_function,
            layer_norm_eps=config.layer_norm_epsilon,
            attention_scale=head_dim**-0.5 if config.scale_attn_weights else 1.0,
            tied_embeddings=config.tie_word_embeddings,
        )
    raise UnsupportedAuxiliaryModelError(
        f"Auxiliary model type {family!r} is not supported by TinT / tint_step. Supported families: "
        f"{', '.join(SUPPORTED_FAMILIES)} (pre-LayerNorm). For other causal LMs use tint_hf.simulate.exact_step, "
        "which works for any HF model."
    )


# (HF parameter path relative to the layer, transpose?) for every canonical layer key that maps 1:1.
_OPT_LAYER_MAP = {
    "ln1": "self_attn_layer_norm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.out_proj", "ln2": "final_layer_norm", "fc1": "fc1", "fc2": "fc2",
}
_GPT2_LAYER_MAP = {"ln1": "ln_1", "o": "attn.c_proj", "ln2": "ln_2", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}


def _backbone(model: nn.Module, family: str) -> tuple[nn.Module, str]:
    """The module holding embeddings and layers, and its parameter-name prefix."""
    if family == "opt":
        return model.model.decoder, "model.decoder"
    return model.transformer, "transformer"


def read_auxiliary(model: nn.Module) -> tuple[AuxiliarySpec, dict[str, torch.Tensor]]:
    """Canonical weights of ``model`` (detached views, no copies) and its :class:`AuxiliarySpec`."""
    spec = auxiliary_spec(model.config)
    body, _ = _backbone(model, spec.family)
    d = spec.hidden_size
    if spec.family == "opt":
        weights = {"embed_tokens": body.embed_tokens.weight, "embed_positions": body.embed_positions.weight,
                   "final_norm.weight": body.final_layer_norm.weight, "final_norm.bias": body.final_layer_norm.bias}
        layers = body.layers
    else:
        weights = {"embed_tokens": body.wte.weight, "embed_positions": body.wpe.weight,
                   "final_norm.weight": body.ln_f.weight, "final_norm.bias": body.ln_f.bias}
        layers = body.h
    if not spec.tied_embeddings:
        weights["lm_head"] = model.get_output_embeddings().weight
    for i, layer in enumerate(layers):
        if spec.family == "opt":
            for name, path in _OPT_LAYER_MAP.items():
                module = layer.get_submodule(path)
                weights[layer_key(i, f"{name}.weight")] = module.weight
                weights[layer_key(i, f"{name}.bias")] = module.bias
        else:
            for name, path in _GPT2_LAYER_MAP.items():
                module = layer.get_submodule(path)
                is_conv1d = name not in ("ln1", "ln2")  # GPT-2 Conv1D stores (in, out)
                weights[layer_key(i, f"{name}.weight")] = module.weight.T if is_conv1d else module.weight
                weights[layer_key(i, f"{name}.bias")] = module.bias
            c_attn = layer.attn.c_attn
            for j, name in enumerate("qkv"):
                weights[layer_key(i, f"{name}.weight")] = c_attn.weight[:, j * d:(j + 1) * d].T
                weights[layer_key(i, f"{name}.bias")] = c_attn.bias[j * d:(j + 1) * d]
    return spec, {name: w.detach() for name, w in weights.items()}


def to_hf_parameters(model: nn.Module, canonical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map canonical weights (optionally with a leading batch dim) back to ``model``'s parameter names.

    Only the parameters present in ``canonical`` are returned. For GPT-2, ``c_attn`` is rebuilt from q, k and v,
    so all three must be given together (missing ones are taken from ``model``).
    """
    spec = auxiliary_spec(model.config)
    d = spec.hidden_size
    _, prefix = _backbone(model, spec.family)
    layer_prefix = f"{prefix}.layers" if spec.family == "opt" else f"{prefix}.h"
    top = {"embed_tokens": "embed_tokens.weight" if spec.family == "opt" else "wte.weight",
           "embed_positions": "embed_positions.weight" if spec.family == "opt" else "wpe.weight",
           "final_norm.weight": "final_layer_norm.weight" if spec.family == "opt" else "ln_f.weight",
           "final_norm.bias": "final_layer_norm.bias" if spec.family == "opt" else "ln_f.bias"}
    out: dict[str, torch.Tensor] = {}
    pending_qkv: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in canonical.items():
        if name in top:
            out[f"{prefix}.{top[name]}"] = tensor
            continue
        if name == "lm_head":
            out["lm_head.weight"] = tensor
            continue
        _, idx, module, kind = name.split(".")
        i = int(idx)
        if spec.family == "opt":
            out[f"{layer_prefix}.{i}.{_OPT_LAYER_MAP[module]}.{kind}"] = tensor
        elif module in "qkv":
            pending_qkv.setdefault(i, {})[f"{module}.{kind}"] = tensor
        else:
            transpose = kind == "weight" and module not in ("ln1", "ln2")
            out[f"{layer_prefix}.{i}.{_GPT2_LAYER_MAP[module]}.{kind}"] = tensor.transpose(-1, -2) if transpose else tensor
    if pending_qkv:
        _, current = read_auxiliary(model)
        for i, parts in pending_qkv.items():
            full = {f"{m}.{kind}": parts.get(f"{m}.{kind}", current[layer_key(i, f"{m}.{kind}")])
                    for m in "qkv" for kind in ("weight", "bias")}
            batch_shape = torch.broadcast_shapes(*(full[f"{m}.weight"].shape[:-2] for m in "qkv"))
            out[f"{layer_prefix}.{i}.attn.c_attn.weight"] = torch.cat(
                [full[f"{m}.weight"].expand(*batch_shape, d, d).transpose(-1, -2) for m in "qkv"], dim=-1)
            out[f"{layer_prefix}.{i}.attn.c_attn.bias"] = torch.cat(
                [full[f"{m}.bias"].expand(*batch_shape, d) for m in "qkv"], dim=-1)
    return out
