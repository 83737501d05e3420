"""MesaOPT: OPT with mesa-layers (von Oswald et al. 2023; MesaNet 2025) in place of chosen softmax attentions.

Parameter names are those of :class:`~transformers.OPTForCausalLM` (``model.decoder.layers.{i}.self_attn.q_proj``
...), so every OPT weight is reused: :meth:`MesaOPTForCausalLM.from_opt` copies an OPT model and initialises only
the new mesa parameters. Softmax layers are HF's own ``OPTDecoderLayer``/``OPTAttention``. A mesa layer, on the
attention input u (B, T, hidden) of a layer with ``heads`` heads of width d:

    q, k, v = q_proj(u), k_proj(u), v_proj(u)                 split into heads: (B, heads, T, d)
              (with short_conv_size = K: each is SiLU(causal depthwise conv of width K) of the projection)
    q, k    = q / |q|, k / |k|                                 (per head and token)
    gamma   = sigmoid(f_proj(u)), beta = sigmoid(b_proj(u))    (B, heads, T); 1 when a gate is off; padding: 1, 0
    lambda  = softplus(lambda_params) + lambda_min             (heads, d)
    o_t     = S_t^T (H_t + diag(lambda))^{-1} q_t              (mesa_op.py = tint_hf/ops/mesa.py; state (H, S) in float32)
    y       = out_proj(concat_heads(RMSNorm_head(o) * o_norm.weight [* SiLU(g_proj(u)) with use_output_gate]))

Packed sequences (``position_ids`` that restart at 0 for each document, no ``attention_mask``, as
``DataCollatorWithFlattening`` makes them): mesa states and convolutions restart at each document and softmax
layers get HF's block-diagonal causal mask.

Generation uses a :class:`~transformers.DynamicCache` (the ``cache`` argument of transformers >= 5.24) built from
``config.layer_types``: key/value layers for softmax layers and :class:`MesaStateLayer` (the fixed-size (H, S)
state) for mesa layers.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, OPTForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.opt.modeling_opt import OPTAttention, OPTLearnedPositionalEmbedding
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .configuration_mesa_opt import MesaOPTConfig
from .mesa_op import MesaState, chunk_mesa, fla_available, fla_chunk_mesa, mesa_step, state_dtype

MESA_PARAMETERS = frozenset({"lambda_params", "f_proj", "b_proj", "o_norm", "g_proj", "q_conv1d", "k_conv1d",
                             "v_conv1d"})
"""Names of the parameters a mesa layer adds to OPT's attention (everything else is loaded from OPT)."""


class MesaStateLayer(CacheLayerMixin):
    """Cache of one mesa layer: the fixed-size state (H, S) after the tokens seen so far, and their count.

    ``update(H, S, num_new_tokens)`` *replaces* the state (key/value layers append). H is (B, heads, d, d) or None
    (solver ``"gd"``), S is (B, heads, d, d); both float32 whatever the model dtype. The state cannot be rewound,
    so ``crop`` (assisted decoding) is unsupported.
    """

    _layer_type = "mesa"  # registers the layer type, so that DynamicCache(config) builds it for "mesa" layers
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.h_state: torch.Tensor | None = None
        self.s_state: torch.Tensor | None = None
        self.conv_state: torch.Tensor | None = None  # (B, K - 1, 3 * hidden): the last q/k/v projections
        self.seen_tokens = 0

    @property
    def state(self) -> MesaState | None:
        """(H, S), or None before the first token."""
        return (self.h_state, self.s_state) if self.seen_tokens > 0 else None

    def lazy_initialization(self, h_state: torch.Tensor | None, s_state: torch.Tensor) -> None:
        self.device = s_state.device
        self.is_initialized = True

    def update(
        self, h_state: torch.Tensor | None, s_state: torch.Tensor, num_new_tokens: int = 1, **kwargs
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(h_state, s_state)
        self.h_state, self.s_state = h_state, s_state
        self.seen_tokens += num_new_tokens
        return h_state, s_state

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _map_states(self, fn) -> None:
        if self.seen_tokens > 0:
            self.s_state = fn(self.s_state)
            self.h_state = None if self.h_state is None else fn(self.h_state)
            self.conv_state = None if self.conv_state is None else fn(self.conv_state)

    def reset(self) -> None:
        self.h_state = self.s_state = self.conv_state = None
        self.seen_tokens = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_states(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_states(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_states(lambda x: x[indices])

    def offload(self) -> None:
        self._map_states(lambda x: x.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map_states(lambda x: x.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("A mesa layer's state cannot be rewound (no assisted or speculative decoding).")


def document_ids(resets: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(B, T) index of the packed document of each token: the number of resets up to it (0 continues the cache)."""
    if resets is None:
        return torch.zeros(batch, length, dtype=torch.int32, device=device)
    return resets.to(torch.int32).cumsum(-1)


class MesaShortConvolution(nn.Conv1d):
    """MesaNet's short causal depthwise convolution with SiLU: y_t = SiLU(sum_{j<K} w_j x_{t-j}) per channel.

    Inputs before the sequence come from ``state`` (the last K - 1 inputs of earlier calls, zeros at first), never
    from another packed document (``resets``) or from padding (``token_mask``). Parameters are those of
    ``nn.Conv1d(C, C, K, groups=C, bias=False)`` (weight (C, 1, K), the last tap on the current token).
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
                resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C); state (B, K - 1, C) or None; token_mask, resets (B, T). Returns y (B, T, C) and the state
        after the sequence (B, K - 1, C), holding only inputs of the last document."""
        batch, length, channels = x.shape
        width = self.kernel_size[0]
        if token_mask is not None:
            x = x * token_mask[..., None].to(x.dtype)
        history = x.new_zeros(batch, width - 1, channels) if state is None else state.to(x.dtype)
        inputs = torch.cat([history, x], dim=1)  # (B, K - 1 + T, C)
        docs = F.pad(document_ids(resets, batch, length, x.device), (width - 1, 0))  # history: document 0
        weight = self.weight[:, 0].to(x.dtype)  # (C, K)
        y = torch.zeros_like(x)
        for lag in range(width):  # tap K - 1 - lag multiplies x_{t - lag}
            window = slice(width - 1 - lag, width - 1 - lag + length)
            same_doc = (docs[:, window] == docs[:, width - 1 :])[..., None]
            y = y + weight[:, width - 1 - lag] * inputs[:, window] * same_doc
        new_state = (inputs[:, -(width - 1) :] * (docs[:, -(width - 1) :] == docs[:, -1:])[..., None])
        return F.silu(y), new_state


class MesaHeadRMSNorm(nn.Module):
    """RMSNorm over each head's channels with a per-head, per-channel weight: (B, heads, T, d) -> same."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight[:, None, :].to(x.dtype)


class MesaOPTMesaAttention(nn.Module):
    """The mesa-layer token mixer of one decoder layer, a drop-in for ``OPTAttention`` (same projections)."""

    def __init__(self, config: MesaOPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        hidden, bias = config.hidden_size, config.enable_bias
        self.q_proj = nn.Linear(hidden, hidden, bias=bias)
        self.k_proj = nn.Linear(hidden, hidden, bias=bias)
        self.v_proj = nn.Linear(hidden, hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, hidden, bias=bias)
        self.f_proj = nn.Linear(hidden, self.num_heads) if config.use_forget_gate else None
        self.b_proj = nn.Linear(hidden, self.num_heads) if config.use_input_gate else None
        self.lambda_params = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))
        self.o_norm = MesaHeadRMSNorm(self.num_heads, self.head_dim)
        self.g_proj = nn.Linear(hidden, hidden, bias=False) if config.use_output_gate else None
        width = config.short_conv_size
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (
            (MesaShortConvolution(hidden, width) for _ in range(3)) if width else (None, None, None)
        )

    def _use_fla(self, q: torch.Tensor, resets: torch.Tensor | None) -> bool:
        """Whether this call runs on flash-linear-attention's kernels (``mesa_backend``; see the config)."""
        backend = self.config.mesa_backend
        if backend == "fla":  # the config already refused solvers fla does not implement
            if resets is not None:
                raise ValueError("mesa_backend='fla' does not take packed sequences here; use mesa_backend='torch' "
                                 "or 'auto' (which runs packed batches on the torch path).")
            return True
        applicable = q.is_cuda and self.config.mesa_solver == "cg" and self.head_dim <= 128 and resets is None
        return backend == "auto" and applicable and fla_available()

    def _projections(self, hidden_states: torch.Tensor, layer_cache: MesaStateLayer | None,
                     attention_mask: torch.Tensor | None, resets: torch.Tensor | None) -> list[torch.Tensor]:
        """q, k, v (B, T, hidden): the projections, through the short convolutions when configured (their state
        read from and written to ``layer_cache``)."""
        q, k, v = (proj(hidden_states) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.q_conv1d is None:
            return [q, k, v]
        hidden = q.shape[-1]
        previous = None if layer_cache is None or layer_cache.conv_state is None else layer_cache.conv_state
        outputs, states = [], []
        for i, (conv, x) in enumerate(zip((self.q_conv1d, self.k_conv1d, self.v_conv1d), (q, k, v), strict=True)):
            state = None if previous is None else previous[..., i * hidden : (i + 1) * hidden]
            y, new_state = conv(x, state, attention_mask, resets)
            outputs.append(y)
            states.append(new_state)
        if layer_cache is not None:
            layer_cache.conv_state = torch.cat(states, dim=-1)
        return outputs

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        resets: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, None]:
        """hidden_states: (B, T, hidden); attention_mask: (B, T), 0 on padding, or None; resets: (B, T) bool, True
        at the first token of each packed document, or None. Returns ((B, T, hidden), None)."""
        bsz, length, _ = hidden_states.shape
        heads_shape = (bsz, length, self.num_heads, self.head_dim)
        dtype = state_dtype(hidden_states.dtype)
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        state = layer_cache.state if layer_cache is not None else None
        if state is not None and state[1].shape[0] != bsz:
            raise ValueError(
                f"The cache holds mesa states for {state[1].shape[0]} sequences but the input has {bsz}; pass a fresh "
                "cache (or none) for a new batch."
            )
        # (B, heads, T, d) in the state dtype; unit-norm queries and keys
        q, k, v = (x.view(heads_shape).transpose(1, 2).to(dtype)
                   for x in self._projections(hidden_states, layer_cache, attention_mask, resets))
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        # gates: (B, heads, T); padded tokens get g = 0, beta = 0 and leave the state unchanged
        gate_shape = (bsz, self.num_heads, length)
        g = q.new_zeros(gate_shape) if self.f_proj is None else F.logsigmoid(self.f_proj(hidden_states).to(dtype)).mT
        beta = q.new_ones(gate_shape) if self.b_proj is None else torch.sigmoid(self.b_proj(hidden_states).to(dtype)).mT
        if attention_mask is not None:
            token_mask = attention_mask[:, None, :].to(dtype)
            g, beta = g * token_mask, beta * token_mask
        lam = F.softplus(self.lambda_params.to(dtype)) + self.config.lambda_min  # (heads, d)

        solver, cg_steps = self.config.mesa_solver, self.config.cg_steps
        if state is not None and length == 1:  # decoding: one recurrent step
            decode_steps = self.config.cg_steps_decode or cg_steps
            o, state = mesa_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], lam, g[:, :, 0], beta[:, :, 0], state, solver,
                                 decode_steps, None if resets is None else resets[:, 0])
            o = o[:, :, None]
        elif self._use_fla(q, resets):
            o, state = fla_chunk_mesa(q, k, v, lam, g, beta, state, cg_steps)
        else:  # training, prefill, or several new tokens: chunkwise-parallel form from the cached state
            o, state = chunk_mesa(q, k, v, lam, g, beta, state, solver, cg_steps, self.config.chunk_size, resets)
        if cache is not None:
            cache.update(*state, self.layer_idx, num_new_tokens=length)

        o = self.o_norm(o.to(dtype)).transpose(1, 2).reshape(bsz, length, -1).to(hidden_states.dtype)  # (B, T, hidden)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(hidden_states))
        return self.out_proj(o), None


class MesaOPTDecoderLayer(GradientCheckpointingLayer):
    """One OPT decoder layer (pre- or post-LN attention and MLP) whose token mixer is a mesa layer when ``is_mesa``,
    else HF's ``OPTAttention``. Same parameter names as ``OPTDecoderLayer``, so OPT checkpoints load unchanged."""

    def __init__(self, config: MesaOPTConfig, layer_idx: int):
        super().__init__()
        self.is_mesa = layer_idx in config.mesa_layers
        mixer = MesaOPTMesaAttention if self.is_mesa else OPTAttention
        self.self_attn = mixer(config, layer_idx=layer_idx)
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


class MesaOPTPreTrainedModel(PreTrainedModel):
    config_class = MesaOPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MesaOPTDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True  # mesa states cannot be rewound: generate refuses assisted decoding
    _no_weight_decay_parameters = ("lambda_params",)  # read by tint_hf.training.DecayAwareTrainer

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """OPT's normal(0, init_std) init, then the mesa parameters (runs after the module's children):

        * lambda = lambda_init: lambda_params = softplus^{-1}(lambda_init - lambda_min);
        * forget gate: zero weight, bias log(W_h - 1) so that 1 / (1 - gamma) = W_h, W_h log-spaced per head over
          ``forget_gate_windows`` (short- to long-memory heads);
        * input gate: zero weight and bias (beta = 1/2, which only rescales lambda);
        * output norm weight 1.
        """
        super()._init_weights(module)
        if isinstance(module, MesaOPTMesaAttention):
            config = self.config
            init.constant_(module.lambda_params, math.log(math.expm1(config.lambda_init - config.lambda_min)))
            if module.f_proj is not None:
                shortest, longest = config.forget_gate_windows
                windows = torch.logspace(math.log10(shortest), math.log10(longest), module.num_heads)
                init.zeros_(module.f_proj.weight)
                init.copy_(module.f_proj.bias, torch.log(windows - 1))
            if module.b_proj is not None:
                init.zeros_(module.b_proj.weight)
                init.zeros_(module.b_proj.bias)
        if isinstance(module, MesaShortConvolution):  # starts as y_t = SiLU(x_t): the current token only
            init.zeros_(module.weight)
            init.constant_(module.weight[..., -1], 1.0)


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

    def _layer_cache(self, cache: Cache | None) -> Cache:
        """The cache to use: the given one, or a fresh ``DynamicCache(config)`` (mesa state layers included)."""
        if cache is not None:
            is_mesa = [isinstance(layer, MesaStateLayer) for layer in cache.layers]
            if is_mesa == [layer_type == "mesa" for layer_type in self.config.layer_types]:
                return cache
            if cache.get_seq_length() > 0:
                raise ValueError("MesaOPT needs a cache made by DynamicCache(config=model.config) (mesa state layers).")
        return DynamicCache(config=self.config)

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
        _check_forward_kwargs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}.")
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={self.config.vocab_size}); got values in "
                    f"[{int(input_ids.min())}, {int(input_ids.max())}]. Check the tokenizer matches the model."
                )
            inputs_embeds = self.embed_tokens(input_ids)
        # packed documents: position_ids restart inside the block and there is no attention_mask (HF's convention)
        resets = None
        if attention_mask is None and position_ids is not None:
            resets = packed_document_starts(position_ids)
        if resets is not None and (cache is not None or use_cache):
            raise ValueError("Packed sequences (position_ids restarting at 0 inside a row) are a training / scoring "
                             "format and take no cache: drop cache= / use_cache=True, or run documents as rows.")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and resets is None
        cache = self._layer_cache(cache) if use_cache or cache is not None else None
        batch, length = inputs_embeds.shape[:2]
        past_seen = cache.get_seq_length() if cache is not None else 0

        # positions count real tokens only (left padding), as in OPT
        full_mask = attention_mask
        if full_mask is None:
            full_mask = torch.ones(batch, past_seen + length, device=inputs_embeds.device, dtype=torch.long)
        elif full_mask.shape != (batch, past_seen + length):
            raise ValueError(
                f"attention_mask must be (batch, past + new tokens) = {(batch, past_seen + length)}, got "
                f"{tuple(full_mask.shape)}."
            )
        if position_ids is None:
            position_ids = (full_mask.cumsum(1) * full_mask - 1).long()[:, past_seen:]
        if position_ids.max() + self.embed_positions.offset >= self.embed_positions.num_embeddings:
            raise ValueError(
                f"Positions up to {int(position_ids.max())} exceed the position table "
                f"(max_position_embeddings={self.config.max_position_embeddings}); shorten the input."
            )
        token_mask = None if attention_mask is None else attention_mask[:, -length:]
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
                attention_mask=token_mask if layer.is_mesa else causal_mask,
                cache=cache,
                position_ids=position_ids,
                resets=resets,
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


def packed_document_starts(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) bool, True where a packed document starts inside the block (``position_ids`` does not continue by +1,
    HF's convention for packed sequences); None when nothing restarts."""
    starts = F.pad(position_ids[:, 1:] != position_ids[:, :-1] + 1, (1, 0))
    return starts if bool(starts.any()) else None


def _check_forward_kwargs(kwargs: dict) -> None:
    """Refuse keyword arguments MesaOPT does not implement, instead of letting ``**kwargs`` swallow them."""
    if kwargs.get("output_attentions"):
        raise ValueError("MesaOPT does not return attention probabilities (mesa layers have none); "
                         "drop output_attentions.")
    if "past_key_values" in kwargs:
        raise TypeError("MesaOPT takes the cache as `cache=` (transformers >= 5.24 renamed `past_key_values`).")
    unknown = sorted(set(kwargs) - {"num_items_in_batch", "output_attentions"})
    if unknown:
        raise TypeError(f"MesaOPT forward got unsupported keyword argument(s) {unknown}; packed sequences "
                        "(cu_seq_lens_*, seq_idx) and other options are not implemented.")


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
    def forward(self, *args, **kwargs) -> BaseModelOutputWithPast:
        """Same arguments as :meth:`MesaOPTDecoder.forward`."""
        return self.decoder(*args, **kwargs)


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
        drop = {"model_type", "architectures", "transformers_version", "auto_map"}
        opt_fields = {key: value for key, value in opt.config.to_dict().items() if key not in drop}
        config = MesaOPTConfig(**{**opt_fields, **mesa_kwargs})
        model = cls(config).to(device=opt.device, dtype=opt.dtype)
        missing, unexpected = model.load_state_dict(opt.state_dict(), strict=False)
        not_mesa = [key for key in missing if not MESA_PARAMETERS.intersection(key.split("."))]
        if unexpected or not_mesa:
            raise ValueError(f"OPT weights did not map onto MesaOPT: unexpected {unexpected}, missing {not_mesa}.")
        model.generation_config = opt.generation_config
        return model.eval()

    @can_return_tuple
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
        outputs = self.model.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            position_ids=position_ids,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states)


__all__ = ["MesaOPTForCausalLM", "MesaOPTModel", "MesaOPTPreTrainedModel", "MesaStateLayer"]
