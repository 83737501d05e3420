"""MesaOPT: OPT with mesa-layers (von Oswald et al. 2023; MesaNet 2025) in place of chosen softmax attentions.

Parameter names are those of :class:`~transformers.OPTForCausalLM` (``model.decoder.layers.{i}.self_attn.q_proj``
...), so every OPT weight is reused: :meth:`MesaOPTForCausalLM.from_opt` copies an OPT model and initialises only
the new mesa parameters. Softmax layers use HF's own ``OPTAttention``; mesa layers the ``MesaAttention`` mixer of
``mesa_layer.py`` (its maths is written out there; the op is ``mesa_op.py``).

Packed sequences (``position_ids`` that restart at 0 for each document, no ``attention_mask``, as
``DataCollatorWithFlattening`` makes them): mesa states and convolutions restart at each document and softmax
layers get HF's block-diagonal causal mask.

Generation uses a :class:`~transformers.DynamicCache` (the ``cache`` argument of transformers >= 5.24) built from
``config.layer_types``: key/value layers for softmax layers and ``MesaStateLayer`` (the fixed-size (H, S) state and
the short convolution's last inputs) for mesa layers.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, OPTForCausalLM, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.opt.modeling_opt import OPTAttention, OPTLearnedPositionalEmbedding
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_mesa_opt import MesaOPTConfig
from .mesa_layer import MesaAttention, MesaStateLayer, init_mesa_parameters
from .modeling_mesa import (
    MESA_STRUCTURE,
    WholeCheckpointMixin,
    causal_lm_outputs,
    mesa_model_from_base,
    prepare_mesa_inputs,
)


class MesaOPTDecoderLayer(GradientCheckpointingLayer):
    """One OPT decoder layer (pre- or post-LN attention and MLP) whose token mixer is a mesa layer when ``is_mesa``,
    else HF's ``OPTAttention``. Same parameter names as ``OPTDecoderLayer``, so OPT checkpoints load unchanged."""

    def __init__(self, config: MesaOPTConfig, layer_idx: int):
        super().__init__()
        self.is_mesa = layer_idx in config.mesa_layers
        heads = config.num_attention_heads
        self.self_attn = (
            MesaAttention(config, layer_idx, heads, heads, config.hidden_size // heads, config.enable_bias)
            if self.is_mesa else OPTAttention(config, layer_idx=layer_idx)
        )
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = config.dropout
        self.activation_fn = ACT2FN[config.activation_function]
        hidden, affine = config.hidden_size, config.layer_norm_elementwise_affine
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = nn.Linear(hidden, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, hidden, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)

    def _sublayer(self, hidden_states: torch.Tensor, norm: nn.LayerNorm, fn) -> torch.Tensor:
        """Residual sub-layer: pre-LN ``x + f(LN(x))`` or post-LN ``LN(x + f(x))``, dropout on ``f``."""
        update = fn(norm(hidden_states) if self.do_layer_norm_before else hidden_states)
        hidden_states = hidden_states + F.dropout(update, p=self.dropout, training=self.training)
        return hidden_states if self.do_layer_norm_before else norm(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        resets: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """hidden_states (B, T, hidden) -> (B, T, hidden). ``attention_mask``: the (B, T) token mask for a mesa layer,
        the causal mask of ``create_causal_mask`` for a softmax layer (which has the packed documents in it);
        ``resets`` (B, T): the packed documents' first tokens, for a mesa layer."""
        mesa_only = {"resets": resets} if self.is_mesa else {}

        def mix(x: torch.Tensor) -> torch.Tensor:
            return self.self_attn(x, attention_mask=attention_mask, cache=cache, position_ids=position_ids,
                                  **mesa_only, **kwargs)[0]

        hidden_states = self._sublayer(hidden_states, self.self_attn_layer_norm, mix)
        return self._sublayer(hidden_states, self.final_layer_norm, lambda x: self.fc2(self.activation_fn(self.fc1(x))))


class MesaOPTPreTrainedModel(WholeCheckpointMixin, PreTrainedModel):
    structure_fields = (*MESA_STRUCTURE, "activation_function", "do_layer_norm_before", "enable_bias",
                        "layer_norm_elementwise_affine", "_remove_final_layer_norm")
    from_base = "MesaOPTForCausalLM.from_opt(path, mesa_layers=[...])"
    config_class = MesaOPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MesaOPTDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True  # mesa states cannot be rewound: generate refuses assisted decoding
    _no_weight_decay_parameters = ("lambda_params",)  # read by tint_hf.training.DecayAwareTrainer

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """OPT's normal(0, init_std) init, then the mesa parameters' (``init_mesa_parameters`` in
        ``mesa_layer.py``; this runs after the module's children)."""
        super()._init_weights(module)
        init_mesa_parameters(module, self.config)


class MesaOPTDecoder(nn.Module):
    """OPT's decoder (token and learned position embeddings, layers, final LayerNorm) with mesa layers."""

    def __init__(self, config: MesaOPTConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim, config.pad_token_id)
        self.embed_positions = OPTLearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size)
        projected = config.word_embed_proj_dim != config.hidden_size
        self.project_out = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False) if projected else None
        self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False) if projected else None
        keep_final_norm = config.do_layer_norm_before and not config._remove_final_layer_norm
        self.final_layer_norm = (
            nn.LayerNorm(config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine)
            if keep_final_norm
            else None
        )
        self.layers = nn.ModuleList(MesaOPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

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
        """input_ids (B, T) or inputs_embeds (B, T, word_embed_proj_dim); attention_mask (B, past + T), 0 on padding.

        A cache is built (``use_cache``, default ``config.use_cache``) only outside training, or when one is given.
        ``output_hidden_states`` returns the embeddings and every layer's output (the last one after the final norm).
        """
        prepared = prepare_mesa_inputs(self, "MesaOPT", input_ids, inputs_embeds, attention_mask, cache, use_cache,
                                       position_ids, kwargs)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        inputs_embeds, cache, past_seen = prepared.inputs_embeds, prepared.cache, prepared.past_seen
        batch, length = inputs_embeds.shape[:2]

        # positions count real tokens only (left padding), as in OPT
        full_mask = attention_mask
        if full_mask is None:
            full_mask = torch.ones(batch, past_seen + length, device=inputs_embeds.device, dtype=torch.long)
        if position_ids is None:
            position_ids = (full_mask.cumsum(1) * full_mask - 1).long()[:, past_seen:]
        if position_ids.max() + self.embed_positions.offset >= self.embed_positions.num_embeddings:
            raise ValueError(
                f"Positions up to {int(position_ids.max())} exceed the position table "
                f"(max_position_embeddings={self.config.max_position_embeddings}); shorten the input."
            )
        causal_mask = None
        if len(self.config.mesa_layers) < self.config.num_hidden_layers:
            causal_mask = create_causal_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                position_ids=position_ids,
            )

        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)
        hidden_states = inputs_embeds + self.embed_positions(full_mask, past_seen, position_ids=position_ids)
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=prepared.token_mask if layer.is_mesa else causal_mask,
                cache=cache,
                position_ids=position_ids,
                resets=prepared.resets,
                **kwargs,
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache, hidden_states=None if all_hidden is None else tuple(all_hidden)
        )


class MesaOPTModel(MesaOPTPreTrainedModel):
    def __init__(self, config: MesaOPTConfig):
        super().__init__(config)
        self.decoder = MesaOPTDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.decoder.embed_tokens = value

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
        """The decoder's outputs; arguments as :meth:`MesaOPTDecoder.forward`."""
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                            inputs_embeds=inputs_embeds, use_cache=use_cache, position_ids=position_ids,
                            output_hidden_states=output_hidden_states, **kwargs)


class MesaOPTForCausalLM(MesaOPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: MesaOPTConfig):
        super().__init__(config)
        self.model = MesaOPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.decoder.embed_tokens = value

    @classmethod
    def from_opt(cls, opt: OPTForCausalLM | str | os.PathLike, **mesa_kwargs) -> MesaOPTForCausalLM:
        """A MesaOPT with every weight of an OPT model (instance or local directory) and fresh mesa parameters.

        ``mesa_kwargs`` are :class:`MesaOPTConfig` fields (``mesa_layers=[...]``, ``mesa_solver``, ...). Raises if any
        OPT weight is not used or any non-mesa parameter is left unloaded. The result is in eval mode, in OPT's dtype.
        """
        if not isinstance(opt, OPTForCausalLM):
            opt = OPTForCausalLM.from_pretrained(opt, dtype=torch.float32)
        return mesa_model_from_base(cls, opt, **mesa_kwargs)

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
        outputs = self.model.decoder(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                                     inputs_embeds=inputs_embeds, use_cache=use_cache, position_ids=position_ids,
                                     **kwargs)
        return causal_lm_outputs(self, outputs, labels, logits_to_keep, num_items_in_batch)


__all__ = ["MesaOPTForCausalLM", "MesaOPTModel", "MesaOPTPreTrainedModel", "MesaStateLayer"]
