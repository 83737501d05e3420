"""Canonical view of a supported auxiliary (simulated) language model.

TinT and the reference simulator both work on one family-independent description of a pre-norm decoder:

    h_0   = E[x_t] (+ P[pos_t + offset] for learned positions)
    per layer i:
      u   = N1(h)                  q, k, v = u W_q^T (+ b_q), u W_k^T (+ b_k), u W_v^T (+ b_v)
      h   = h + Attn(q, k, v) W_o^T (+ b_o)          causal softmax attention; rotary q/k for RoPE families;
                                                    k/v may have fewer heads than q (grouped-query attention)
      plain MLP:  h = h + act(N2(h) W_1^T + b_1) W_2^T + b_2
      gated MLP:  x = N2(h);  h = h + (act(x W_g^T) * (x W_1^T)) W_2^T                (SwiGLU)
    logits = N_f(h) U^T                              (U = lm_head weight, usually tied to E)

N is LayerNorm (``gamma * (x - mean) / std + beta``) or RMSNorm (``gamma * x / rms``, no beta).

Weights are kept in a flat ``dict[str, Tensor]`` with the names below (linear weights in ``nn.Linear`` layout
``(out, in)``); a per-sequence copy of a weight simply carries a leading batch dimension. Biases exist only where
the family has them (``spec.has_bias``; LayerNorm betas only for LayerNorm).

    embed_tokens (V, d)   embed_positions (T_max + offset, d), learned positions only   final_norm.{weight, bias}
    lm_head (V, d), absent when tied to embed_tokens (``spec.tied_embeddings``)
    layers.{i}.{ln1, ln2}.{weight, bias} (d)    layers.{i}.{q, o}.{weight (d, d), bias (d)}
    layers.{i}.{k, v}.{weight (d_kv, d), bias (d_kv)}  with d_kv = kv_heads * head_dim
    layers.{i}.fc1.{weight (d_ff, d), bias}     layers.{i}.gate.weight (d_ff, d), gated MLPs only
    layers.{i}.fc2.{weight (d, d_ff), bias (d)}

Supported families: OPT (pre-LN, ``word_embed_proj_dim == hidden_size``), GPT-2, and Llama (RMSNorm, SwiGLU,
RoPE, GQA; e.g. SmolLM2). This module imports only torch and transformers, so it ships as remote code next to
``modeling_tint.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_FAMILIES = ("opt", "gpt2", "llama")


class UnsupportedAuxiliaryModelError(ValueError):
    """The auxiliary model's architecture cannot be simulated by TinT / ``tint_step``."""


@dataclass(frozen=True)
class AuxiliarySpec:
    """Shape and numerics of the auxiliary model, everything the simulation needs besides the weights."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_positions: int
    activation: str
    norm: str                      # "layernorm" | "rmsnorm"
    norm_eps: float
    attention_scale: float
    tied_embeddings: bool
    has_bias: bool                 # linear layers have biases
    gated_mlp: bool                # SwiGLU-style MLP with a gate projection
    position_offset: int = 0       # learned positions: index offset of the table (OPT: 2)
    rope_inv_freq: tuple[float, ...] | None = None   # rotary positions: inverse frequencies (head_dim / 2)
    rope_scaling: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def learned_positions(self) -> bool:
        return self.rope_inv_freq is None

    def layer_modules(self) -> tuple[str, ...]:
        """Canonical module names of one layer, in forward order."""
        return ("ln1", "q", "k", "v", "o", "ln2") + (("gate",) if self.gated_mlp else ()) + ("fc1", "fc2")

    def parameter_kinds(self, module: str) -> tuple[str, ...]:
        """Which of weight / bias the canonical module has."""
        if module.startswith("ln"):
            return ("weight", "bias") if self.norm == "layernorm" else ("weight",)
        return ("weight", "bias") if self.has_bias and module != "gate" else ("weight",)


def layer_key(layer: int, key: str) -> str:
    return f"layers.{layer}.{key}"


def _require(condition: bool, family: str, problem: str, fix: str) -> None:
    if not condition:
        raise UnsupportedAuxiliaryModelError(
            f"Unsupported {family} auxiliary model: {problem}. {fix} "
            f"TinT and tint_step support these families: {', '.join(SUPPORTED_FAMILIES)} (pre-norm decoders)."
        )


def _rope(config) -> tuple[tuple[float, ...], float]:
    """Inverse frequencies and output scaling of a static rotary embedding, computed as transformers does."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
    rope_type = params.get("rope_type", "default")
    _require(rope_type in ("default", "linear", "llama3", "yarn"), "llama", f"rope_type={rope_type!r} depends on "
             "the sequence length", "Use a static RoPE (default, linear, llama3 or yarn).")
    if rope_type == "default":
        dim = config.hidden_size // config.num_attention_heads
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim  # not on a meta device
        inv_freq = 1.0 / (params["rope_theta"] ** exponents)
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return tuple(inv_freq.tolist()), float(scaling)


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
        return AuxiliarySpec(
            family="opt", num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads, num_kv_heads=config.num_attention_heads, ffn_dim=config.ffn_dim,
            vocab_size=config.vocab_size, max_positions=config.max_position_embeddings,
            activation=config.activation_function, norm="layernorm", norm_eps=1e-5,
            attention_scale=(config.hidden_size // config.num_attention_heads) ** -0.5,
            tied_embeddings=config.tie_word_embeddings, has_bias=True, gated_mlp=False, position_offset=2,
        )
    if family == "gpt2":
        _require(not config.add_cross_attention, "gpt2", "it has cross-attention", "Use a decoder-only GPT-2.")
        _require(not config.scale_attn_by_inverse_layer_idx, "gpt2", "scale_attn_by_inverse_layer_idx=True",
                 "Use a GPT-2 with the standard attention scaling.")
        head_dim = config.n_embd // config.n_head
        return AuxiliarySpec(
            family="gpt2", num_layers=config.n_layer, hidden_size=config.n_embd, num_heads=config.n_head,
            num_kv_heads=config.n_head, ffn_dim=config.n_inner or 4 * config.n_embd, vocab_size=config.vocab_size,
            max_positions=config.n_positions, activation=config.activation_function, norm="layernorm",
            norm_eps=config.layer_norm_epsilon, attention_scale=head_dim**-0.5 if config.scale_attn_weights else 1.0,
            tied_embeddings=config.tie_word_embeddings, has_bias=True, gated_mlp=False,
        )
    if family == "llama":
        head_dim = config.hidden_size // config.num_attention_heads
        _require(config.head_dim == head_dim, "llama", f"head_dim={config.head_dim} != hidden_size / heads",
                 "Use a Llama whose heads tile the hidden size.")
        _require(config.attention_bias == config.mlp_bias, "llama", "attention_bias != mlp_bias",
                 "Use a Llama with biases everywhere or nowhere.")
        _require((config.pretraining_tp or 1) == 1, "llama", "pretraining_tp > 1", "Set pretraining_tp=1.")
        inv_freq, scaling = _rope(config)
        return AuxiliarySpec(
            family="llama", num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
            ffn_dim=config.intermediate_size, vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings, activation=config.hidden_act, norm="rmsnorm",
            norm_eps=config.rms_norm_eps, attention_scale=head_dim**-0.5, tied_embeddings=config.tie_word_embeddings,
            has_bias=config.attention_bias, gated_mlp=True, rope_inv_freq=inv_freq, rope_scaling=scaling,
        )
    raise UnsupportedAuxiliaryModelError(
        f"Auxiliary model type {family!r} is not supported by TinT / tint_step. Supported families: "
        f"{', '.join(SUPPORTED_FAMILIES)} (pre-norm decoders). For other causal LMs use "
        "tint_hf.simulate.exact_step, which works for any HF model."
    )


def rotary_cos_sin(spec: AuxiliarySpec, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin (B, 1, T, head_dim) of the rotary embedding, computed in float32 as transformers does."""
    inv_freq = torch.tensor(spec.rope_inv_freq, dtype=torch.float32, device=position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return ((angles.cos() * spec.rope_scaling).to(dtype).unsqueeze(1),
            (angles.sin() * spec.rope_scaling).to(dtype).unsqueeze(1))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim / 2) of x (B, heads, T, head_dim) by the position angle."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


# Canonical layer module -> (HF path relative to the layer, stored transposed as a GPT-2 Conv1D?).
_LAYER_PATHS = {
    "opt": {"ln1": "self_attn_layer_norm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
            "v": "self_attn.v_proj", "o": "self_attn.out_proj", "ln2": "final_layer_norm", "fc1": "fc1",
            "fc2": "fc2"},
    "gpt2": {"ln1": "ln_1", "o": "attn.c_proj", "ln2": "ln_2", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"},
    "llama": {"ln1": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "ln2": "post_attention_layernorm", "gate": "mlp.gate_proj",
              "fc1": "mlp.up_proj", "fc2": "mlp.down_proj"},
}
# Top-level canonical name -> HF parameter path relative to the backbone.
_TOP_PATHS = {
    "opt": {"embed_tokens": "embed_tokens.weight", "embed_positions": "embed_positions.weight",
            "final_norm.weight": "final_layer_norm.weight", "final_norm.bias": "final_layer_norm.bias"},
    "gpt2": {"embed_tokens": "wte.weight", "embed_positions": "wpe.weight", "final_norm.weight": "ln_f.weight",
             "final_norm.bias": "ln_f.bias"},
    "llama": {"embed_tokens": "embed_tokens.weight", "final_norm.weight": "norm.weight"},
}
_BACKBONE = {"opt": ("model.decoder", "layers"), "gpt2": ("transformer", "h"), "llama": ("model", "layers")}


def _is_conv1d(family: str, module: str) -> bool:
    return family == "gpt2" and not module.startswith("ln")


def read_auxiliary(model: nn.Module) -> tuple[AuxiliarySpec, dict[str, torch.Tensor]]:
    """Canonical weights of ``model`` (detached views, no copies) and its :class:`AuxiliarySpec`."""
    spec = auxiliary_spec(model.config)
    body_path, layers_name = _BACKBONE[spec.family]
    body = model.get_submodule(body_path)
    own = dict(model.named_parameters(remove_duplicate=False))
    weights = {name: own[f"{body_path}.{path}"] for name, path in _TOP_PATHS[spec.family].items()}
    head = model.get_output_embeddings().weight
    if not spec.tied_embeddings:
        weights["lm_head"] = head
    elif head is not weights["embed_tokens"] and not torch.equal(head.detach(), weights["embed_tokens"].detach()):
        raise UnsupportedAuxiliaryModelError(
            "The auxiliary config says tie_word_embeddings=True but the model's LM head is a different tensor from its "
            "token embedding; call model.tie_weights() first (TinT reads the LM head from the embedding)."
        )
    d = spec.hidden_size
    for i, layer in enumerate(body.get_submodule(layers_name)):
        for module, path in _LAYER_PATHS[spec.family].items():
            sub = layer.get_submodule(path)
            for kind in spec.parameter_kinds(module):
                tensor = getattr(sub, kind)
                weights[layer_key(i, f"{module}.{kind}")] = tensor.T if kind == "weight" and _is_conv1d(
                    spec.family, module) else tensor
        if spec.family == "gpt2":  # q, k, v are column blocks of one Conv1D
            c_attn = layer.attn.c_attn
            for j, name in enumerate("qkv"):
                weights[layer_key(i, f"{name}.weight")] = c_attn.weight[:, j * d:(j + 1) * d].T
                weights[layer_key(i, f"{name}.bias")] = c_attn.bias[j * d:(j + 1) * d]
    return spec, {name: w.detach() for name, w in weights.items()}
