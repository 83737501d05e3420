"""MesaLlama: a Llama-family decoder (Llama, SmolLM2, ...) with mesa-layers in place of chosen softmax attentions.

Parameter names are those of :class:`~transformers.LlamaForCausalLM` (``model.layers.{i}.self_attn.q_proj`` ...), so
:meth:`MesaLlamaForCausalLM.from_llama` reuses every weight and initialises only the mesa parameters. Softmax
layers use HF's own ``LlamaAttention``; mesa layers the ``MesaAttention`` mixer of ``mesa_layer.py`` (maths
there; op in ``mesa_op.py``), with RoPE applied to their queries and keys before the L2
normalisation (``mesa_rope``) and each grouped key/value head holding one state for its query heads.

Positions follow HF's Llama: ``position_ids`` default to 0..T-1 after the cached tokens (``generate`` passes them
from the attention mask for left-padded rows). Packed sequences (``position_ids`` restarting at 0, no
``attention_mask``, as ``DataCollatorWithFlattening`` makes them) restart the mesa states and convolutions at each
document and give softmax layers HF's block-diagonal mask. Generation uses a ``DynamicCache`` built from
``config.layer_types`` (key/value layers and ``MesaStateLayer`` states).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import GenerationMixin, LlamaForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_mesa_llama import MesaLlamaConfig
from .mesa_layer import MesaAttention, MesaStateLayer, init_mesa_parameters
from .modeling_mesa import (
    MESA_STRUCTURE,
    WholeCheckpointMixin,
    causal_lm_outputs,
    mesa_model_from_base,
    prepare_mesa_inputs,
)


class MesaLlamaDecoderLayer(GradientCheckpointingLayer):
    """One Llama decoder layer (pre-RMSNorm attention and gated MLP, residuals) whose token mixer is a mesa layer
    when ``is_mesa``, else HF's ``LlamaAttention``. Same parameter names as ``LlamaDecoderLayer``."""

    def __init__(self, config: MesaLlamaConfig, layer_idx: int):
        super().__init__()
        self.is_mesa = layer_idx in config.mesa_layers
        self.self_attn = (
            MesaAttention(config, layer_idx, config.num_attention_heads, config.num_key_value_heads,
                          config.mesa_head_dim, config.attention_bias, out_name="o_proj")
            if self.is_mesa else LlamaAttention(config, layer_idx)
        )
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mesa_rope = config.mesa_rope

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        resets: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """hidden_states (B, T, hidden) -> (B, T, hidden). ``attention_mask``: the (B, T) token mask for a mesa layer,
        the causal mask of ``create_causal_mask`` for a softmax layer; ``position_embeddings``: RoPE's (cos, sin);
        ``resets`` (B, T): the packed documents' first tokens, for a mesa layer."""
        normed = self.input_layernorm(hidden_states)
        if self.is_mesa:
            rope = dict(position_embeddings=position_embeddings, rotate=apply_rotary_pos_emb) if self.mesa_rope else {}
            mixed, _ = self.self_attn(normed, attention_mask=attention_mask, cache=cache, resets=resets, **rope)
        else:
            mixed, _ = self.self_attn(hidden_states=normed, attention_mask=attention_mask, position_ids=position_ids,
                                      cache=cache, position_embeddings=position_embeddings, **kwargs)
        hidden_states = hidden_states + mixed
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MesaLlamaPreTrainedModel(WholeCheckpointMixin, PreTrainedModel):
    structure_fields = (*MESA_STRUCTURE, "mesa_rope", "hidden_act", "rope_parameters", "head_dim", "attention_bias",
                        "mlp_bias")
    from_base = "MesaLlamaForCausalLM.from_llama(path, mesa_layers=[...])"
    config_class = MesaLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MesaLlamaDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True  # mesa states cannot be rewound: generate refuses assisted decoding
    _no_weight_decay_parameters = ("lambda_params",)  # read by tint_hf.training.DecayAwareTrainer

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Llama's normal(0, initializer_range) init, then the mesa parameters' (``init_mesa_parameters``)."""
        super()._init_weights(module)
        init_mesa_parameters(module, self.config)


class MesaLlamaModel(MesaLlamaPreTrainedModel):
    """Token embeddings, the decoder layers (softmax or mesa), the final RMSNorm and the rotary embedding."""

    def __init__(self, config: MesaLlamaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MesaLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        """input_ids (B, T) or inputs_embeds (B, T, hidden); attention_mask (B, past + T), 0 on padding.

        A cache is built (``use_cache``, default ``config.use_cache``) only outside training, or when one is given.
        ``output_hidden_states`` returns the embeddings and every layer's output (the last one after the final norm).
        """
        prepared = prepare_mesa_inputs(self, "MesaLlama", input_ids, inputs_embeds, attention_mask, cache, use_cache,
                                       position_ids, kwargs)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        inputs_embeds, cache = prepared.inputs_embeds, prepared.cache
        batch, length = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = (torch.arange(length, device=inputs_embeds.device) + prepared.past_seen)[None].expand(batch, -1)
        causal_mask = None
        if len(self.config.mesa_layers) < self.config.num_hidden_layers:
            causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                             attention_mask=attention_mask, cache=cache, position_ids=position_ids)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=prepared.token_mask if layer.is_mesa else causal_mask,
                cache=cache,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                resets=prepared.resets,
                **kwargs,
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache, hidden_states=None if all_hidden is None else tuple(all_hidden)
        )


class MesaLlamaForCausalLM(MesaLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MesaLlamaConfig):
        super().__init__(config)
        self.model = MesaLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    @classmethod
    def from_llama(cls, llama: LlamaForCausalLM | str | os.PathLike, **mesa_kwargs) -> MesaLlamaForCausalLM:
        """A MesaLlama with every weight of a Llama-family model (instance or local directory) and fresh mesa
        parameters. ``mesa_kwargs`` are :class:`MesaLlamaConfig` fields (``mesa_layers=[...]``, ...). Raises if any
        weight is not used or any non-mesa parameter is left unloaded. The result is in eval mode, in the model's dtype.
        """
        if isinstance(llama, (str, os.PathLike)):
            llama = LlamaForCausalLM.from_pretrained(llama, dtype=torch.float32)
        if not isinstance(llama, LlamaForCausalLM):
            raise TypeError(f"from_llama takes a LlamaForCausalLM (or its folder), got {type(llama).__name__}; for "
                            "OPT use MesaOPTForCausalLM.from_opt.")
        return mesa_model_from_base(cls, llama, **mesa_kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """Next-token logits (B, T, vocab) and, with ``labels`` (B, T; -100 ignored), the shifted cross-entropy."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, position_ids=position_ids, **kwargs)
        return causal_lm_outputs(self, outputs, labels, logits_to_keep, num_items_in_batch)


__all__ = ["MesaLlamaForCausalLM", "MesaLlamaModel", "MesaLlamaPreTrainedModel", "MesaStateLayer"]
