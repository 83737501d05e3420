"""Where TinT's approximations act inside a Hugging Face auxiliary model: the modules and parameters, by HF name.

:func:`tint_hf.simulate.tint_step` runs the HF model itself and applies TinT's rules to the modules listed here;
it reads nothing else about the architecture. Families: OPT (pre-LN), GPT-2 and Llama.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """``tint_step`` has no description of this architecture (use ``exact_step``, which takes any causal LM)."""


@dataclass(frozen=True)
class Family:
    """Module paths of one architecture. Paths inside a layer are relative to the layer module."""

    name: str
    layers: str                      # the ModuleList of decoder layers
    final_norm: str                  # the norm before the LM head
    embeddings: tuple[str, ...]      # token (and learned position) embedding parameters
    norms: tuple[str, ...]           # the two norms of a layer
    linears: tuple[str, ...]         # every linear map of a layer (nn.Linear or GPT-2's Conv1D)
    activation: str                  # the MLP non-linearity module
    queries_keys: tuple[str, ...]    # modules whose parameters are W_Q, W_K (and biases); GPT-2: see fused_qkv
    mlp_out: str                     # the MLP's output projection ("fc2")
    fused_qkv: str | None = None     # GPT-2: one Conv1D whose output columns are [q | k | v]


FAMILIES = {
    "opt": Family(
        name="opt", layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm",
        embeddings=("model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"),
        norms=("self_attn_layer_norm", "final_layer_norm"),
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
        activation="activation_fn", queries_keys=("self_attn.q_proj", "self_attn.k_proj"), mlp_out="fc2",
    ),
    "gpt2": Family(
        name="gpt2", layers="transformer.h", final_norm="transformer.ln_f",
        embeddings=("transformer.wte.weight", "transformer.wpe.weight"), norms=("ln_1", "ln_2"),
        linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), activation="mlp.act", queries_keys=(),
        mlp_out="mlp.c_proj", fused_qkv="attn.c_attn",
    ),
    "llama": Family(
        name="llama", layers="model.layers", final_norm="model.norm", embeddings=("model.embed_tokens.weight",),
        norms=("input_layernorm", "post_attention_layernorm"),
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"),
        activation="mlp.act_fn", queries_keys=("self_attn.q_proj", "self_attn.k_proj"), mlp_out="mlp.down_proj",
    ),
}


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of ``model``, after checking that TinT's step is defined for it."""
    config = model.config
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise UnsupportedModelError(
            f"tint_step supports {', '.join(FAMILIES)} models, not {getattr(config, 'model_type', None)!r}; "
            "tint_hf.simulate.exact_step takes any HF causal LM.")
    if family.name == "opt" and not (config.do_layer_norm_before and config.word_embed_proj_dim == config.hidden_size):
        raise UnsupportedModelError("tint_step needs a pre-LayerNorm OPT whose embeddings have the model width "
                                    "(not OPT-350M: post-LayerNorm, project_in/out); use exact_step.")
    if family.name == "gpt2" and config.add_cross_attention:
        raise UnsupportedModelError("tint_step needs a decoder-only GPT-2 (no cross-attention); use exact_step.")
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if config.tie_word_embeddings and head is not embedding and not torch.equal(head.detach(), embedding.detach()):
        raise UnsupportedModelError("The model's config says tie_word_embeddings=True but its LM head is a different "
                                    "tensor from its token embedding; call model.tie_weights() first.")
    return family
