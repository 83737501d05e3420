"""The mesa-layer as a token mixer for HF decoder layers, shared by the mesa model folders (each links this file as
``mesa_attention.py``): the mixer itself (:class:`MesaAttention`), MesaNet's short convolution, the per-head output
norm, the decode-cache layer of its state, packed-document handling and the initialisation of its parameters.

On the mixer input u (B, T, hidden), with ``heads`` query heads and ``kv_heads`` key/value heads of width d:

    q, k, v = q_proj(u), k_proj(u), v_proj(u)          (B, heads | kv_heads, T, d); with short_conv_size = K each
                                                       is SiLU(causal depthwise conv of width K) of the projection
    q, k    = RoPE(q), RoPE(k)                         when the base model is rotary (Llama family)
    q, k    = q / |q|, k / |k|                         per head and token
    gamma   = sigmoid(f_proj(u)), beta = sigmoid(b_proj(u))   (B, kv_heads, T); 1 when a gate is off; padding: 1, 0
    lambda  = softplus(lambda_params) + lambda_min     (kv_heads, d)
    o_t     = S_t^T (H_t + diag(lambda))^{-1} q_t      (``mesa_op.py``; the state (H, S) of a key/value head is
                                                       shared by its group of query heads)
    y       = out(concat_heads(RMSNorm_head(o) * o_norm.weight [* SiLU(g_proj(u))]))

Grouped heads are run by repeating each key/value head (and its gates and lambda) over its query heads, so the
states of a group are equal; the cache keeps them per query head.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .mesa_op import MesaState, chunk_mesa, fla_available, fla_chunk_mesa, mesa_step, state_dtype

MESA_PARAMETERS = frozenset({"lambda_params", "f_proj", "b_proj", "o_norm", "g_proj", "q_conv1d", "k_conv1d",
                             "v_conv1d"})
"""Names of the parameters a mesa layer adds to the base attention (everything else is loaded from the base model)."""

MESA_STRUCTURE = ("mesa_layers", "short_conv_size", "use_output_gate", "use_forget_gate", "use_input_gate",
                  "lambda_min", "num_attention_heads", "num_key_value_heads")
"""Mesa config fields that give a checkpoint's weights their meaning (:class:`WholeCheckpointMixin`)."""


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


class MesaAttention(nn.Module):
    """The mesa-layer token mixer of one decoder layer, a drop-in for the base model's attention: same projection
    names and shapes (``q_proj``, ``k_proj``, ``v_proj`` and ``out_name``), plus the mesa parameters.

    Args:
        config: a configuration with the ``MesaConfigMixin`` fields; layer_idx: the decoder layer's index.
        num_heads / num_kv_heads / head_dim: query heads, key/value heads (grouped when fewer), head width.
        bias: bias of the q/k/v and output projections; out_name: the output projection's name (``"out_proj"``
        for OPT, ``"o_proj"`` for Llama).
    """

    def __init__(self, config, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool,
                 out_name: str = "out_proj", out_bias: bool | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}.")
        self.config, self.layer_idx, self.out_name = config, layer_idx, out_name
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=bias)
        setattr(self, out_name, nn.Linear(num_heads * head_dim, hidden, bias=bias if out_bias is None else out_bias))
        self.f_proj = nn.Linear(hidden, num_kv_heads) if config.use_forget_gate else None
        self.b_proj = nn.Linear(hidden, num_kv_heads) if config.use_input_gate else None
        self.lambda_params = nn.Parameter(torch.zeros(num_kv_heads, head_dim))
        self.o_norm = MesaHeadRMSNorm(num_heads, head_dim)
        self.g_proj = nn.Linear(hidden, num_heads * head_dim, bias=False) if config.use_output_gate else None
        width = config.short_conv_size
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (
            (MesaShortConvolution(channels, width) for channels in
             (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim))
            if width else (None, None, None)
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
        """q (B, T, heads * d), k and v (B, T, kv_heads * d): the projections, through the short convolutions when
        configured (their state read from and written to ``layer_cache``)."""
        q, k, v = (proj(hidden_states) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.q_conv1d is None:
            return [q, k, v]
        sizes = [q.shape[-1], k.shape[-1], v.shape[-1]]
        previous = None if layer_cache is None or layer_cache.conv_state is None else layer_cache.conv_state.split(sizes, -1)
        outputs, states = [], []
        for i, (conv, x) in enumerate(zip((self.q_conv1d, self.k_conv1d, self.v_conv1d), (q, k, v), strict=True)):
            y, new_state = conv(x, None if previous is None else previous[i], attention_mask, resets)
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
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        rotate: Callable | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """hidden_states: (B, T, hidden); attention_mask: (B, T), 0 on padding, or None; resets: (B, T) bool, True
        at the first token of each packed document, or None; position_embeddings: (cos, sin) with
        ``rotate(q, k, cos, sin)`` (the base model's rotary embedding), or None. Returns ((B, T, hidden), None).
        Other keyword arguments (HF's attention options) do not apply to a mesa layer and are not used."""
        bsz, length, _ = hidden_states.shape
        dtype = state_dtype(hidden_states.dtype)
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        state = layer_cache.state if layer_cache is not None else None
        if state is not None and state[1].shape[0] != bsz:
            raise ValueError(
                f"The cache holds mesa states for {state[1].shape[0]} sequences but the input has {bsz}; pass a fresh "
                "cache (or none) for a new batch."
            )
        q, k, v = (x.view(bsz, length, -1, self.head_dim).transpose(1, 2)  # (B, heads | kv_heads, T, d)
                   for x in self._projections(hidden_states, layer_cache, attention_mask, resets))
        if position_embeddings is not None:
            q, k = rotate(q, k, *position_embeddings)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        # gates: (B, kv_heads, T); padded tokens get g = 0, beta = 0 and leave the state unchanged
        gate_shape = (bsz, self.num_kv_heads, length)
        g = q.new_zeros(gate_shape) if self.f_proj is None else F.logsigmoid(self.f_proj(hidden_states).to(dtype)).mT
        beta = q.new_ones(gate_shape) if self.b_proj is None else torch.sigmoid(self.b_proj(hidden_states).to(dtype)).mT
        if attention_mask is not None:
            token_mask = attention_mask[:, None, :].to(dtype)
            g, beta = g * token_mask, beta * token_mask
        lam = F.softplus(self.lambda_params.to(dtype)) + self.config.lambda_min  # (kv_heads, d)
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # each key/value head (with its gates and lambda) serves its group of query heads
            k, v, g, beta = (x.repeat_interleave(group, dim=1) for x in (k, v, g, beta))
            lam = lam.repeat_interleave(group, dim=0)

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

        o = self.o_norm(o.to(dtype)).transpose(1, 2).reshape(bsz, length, -1).to(hidden_states.dtype)  # (B, T, h*d)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(hidden_states))
        return getattr(self, self.out_name)(o), None


def packed_document_starts(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) bool, True where a packed document starts inside the block (``position_ids`` does not continue by +1,
    HF's convention for packed sequences); None when nothing restarts."""
    starts = F.pad(position_ids[:, 1:] != position_ids[:, :-1] + 1, (1, 0))
    return starts if bool(starts.any()) else None


def check_packed_inputs(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                        cache: Cache | None, use_cache: bool | None) -> torch.Tensor | None:
    """The packed documents' first tokens (:func:`packed_document_starts`) when ``position_ids`` restart inside a
    row and there is no ``attention_mask``; packed inputs take no cache (refused when one is asked for). Positions
    that restart between two real tokens of a row *with* an ``attention_mask`` are refused: the mask would let the
    documents attend to each other (HF's Llama silently does), so a packed batch must come without one."""
    if position_ids is None:
        return None
    if attention_mask is not None:
        if position_ids.shape[-1] == attention_mask.shape[-1] and position_ids.shape[-1] > 1:
            real = attention_mask.bool()
            restart = (position_ids[:, 1:] <= position_ids[:, :-1]) & real[:, 1:] & real[:, :-1]
            if bool(restart.any()):
                raise ValueError("position_ids restart inside a row (packed documents) while an attention_mask is "
                                 "given, which would let the documents attend to each other: pass packed documents "
                                 "without attention_mask (as DataCollatorWithFlattening does), or one per row.")
        return None
    resets = packed_document_starts(position_ids)
    if resets is not None and (cache is not None or use_cache):
        raise ValueError("Packed sequences (position_ids restarting at 0 inside a row) are a training / scoring "
                         "format and take no cache: drop cache= / use_cache=True, or run documents as rows.")
    return resets


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse ids that lie outside the vocabulary, naming the argument."""
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(
            f"input_ids must lie in [0, vocab_size={vocab_size}); got values in "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]. Check the tokenizer matches the model."
        )


def mesa_cache(cache: Cache | None, config) -> Cache:
    """The cache to use: the given one when its layers match ``config.layer_types`` (an empty cache of another
    layout is replaced), else a fresh ``DynamicCache(config)`` with mesa state layers where the mesa layers are."""
    if cache is not None:
        # by layer type, not class: every copy of this file (each model folder, remote code) defines its own
        # MesaStateLayer, and HF's registry keeps the last one imported for the type "mesa"
        is_mesa = [getattr(layer, "_layer_type", None) == "mesa" for layer in cache.layers]
        if is_mesa == [layer_type == "mesa" for layer_type in config.layer_types]:
            return cache
        if cache.get_seq_length() > 0:
            raise ValueError("This cache holds keys and values for every layer (e.g. from peft prefix tuning), but "
                             "mesa layers keep a state, not keys and values: pass a cache made by "
                             "DynamicCache(config=model.config), or none; prefix tuning works on models without mesa "
                             "layers only.")
    return DynamicCache(config=config)


@dataclass
class MesaInputs:
    """What a mesa model's forward starts from: embeddings (B, T, width), the cache (or None), the number of tokens
    it holds, the packed documents' starts (B, T) or None, and the (B, T) token mask of the new tokens or None."""

    inputs_embeds: torch.Tensor
    cache: Cache | None
    past_seen: int
    resets: torch.Tensor | None
    token_mask: torch.Tensor | None


def prepare_mesa_inputs(model: nn.Module, model_name: str, input_ids: torch.Tensor | None,
                        inputs_embeds: torch.Tensor | None, attention_mask: torch.Tensor | None, cache: Cache | None,
                        use_cache: bool | None, position_ids: torch.Tensor | None, kwargs: dict) -> MesaInputs:
    """The checks and set-up shared by the mesa models' forwards: unknown keyword arguments refused, exactly one of
    ``input_ids`` / ``inputs_embeds`` (ids checked and embedded by ``model.embed_tokens``), packed documents found,
    a cache built only outside training (or when given) and never for packed inputs, the mask's shape checked."""
    check_forward_kwargs(kwargs, model_name)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
    name, given, dims = ("input_ids", input_ids, 2) if input_ids is not None else ("inputs_embeds", inputs_embeds, 3)
    if given.dim() != dims or 0 in given.shape[:2]:
        raise ValueError(f"{name} must be ({'batch, length' + ', hidden' * (dims == 3)}) with batch >= 1 and length "
                         f">= 1, got shape {tuple(given.shape)}.")
    if input_ids is not None:
        check_input_ids(input_ids, model.config.vocab_size)
        inputs_embeds = model.embed_tokens(input_ids)
    resets = check_packed_inputs(attention_mask, position_ids, cache, use_cache)
    if use_cache is None:
        use_cache = model.config.use_cache and not model.training and resets is None
    cache = mesa_cache(cache, model.config) if use_cache or cache is not None else None
    batch, length = inputs_embeds.shape[:2]
    past_seen = cache.get_seq_length() if cache is not None else 0
    if attention_mask is not None and attention_mask.shape != (batch, past_seen + length):
        raise ValueError(f"attention_mask must be (batch, past + new tokens) = {(batch, past_seen + length)}, got "
                         f"{tuple(attention_mask.shape)}.")
    token_mask = None if attention_mask is None else attention_mask[:, -length:]
    return MesaInputs(inputs_embeds, cache, past_seen, resets, token_mask)


def causal_lm_outputs(model: nn.Module, outputs: BaseModelOutputWithPast, labels: torch.Tensor | None,
                      logits_to_keep: int | torch.Tensor, num_items_in_batch: int | None) -> CausalLMOutputWithPast:
    """``model.lm_head`` on the kept positions (``logits_to_keep``: the last N, 0 = all, or an index tensor) and,
    with ``labels`` (B, T; -100 ignored), HF's shifted cross-entropy."""
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = model.lm_head(outputs.last_hidden_state[:, keep, :])
    loss = None
    if labels is not None:
        loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size,
                                   num_items_in_batch=num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)


def check_forward_kwargs(kwargs: dict, model_name: str) -> None:
    """Refuse keyword arguments a mesa model does not implement, instead of letting ``**kwargs`` swallow them."""
    if kwargs.get("output_attentions"):
        raise ValueError(f"{model_name} does not return attention probabilities (mesa layers have none); "
                         "drop output_attentions.")
    if "past_key_values" in kwargs:
        raise TypeError(f"{model_name} takes the cache as `cache=` (transformers >= 5.24 renamed `past_key_values`).")
    unknown = sorted(set(kwargs) - {"num_items_in_batch", "output_attentions"})
    if unknown:
        raise TypeError(f"{model_name} forward got unsupported keyword argument(s) {unknown}. For packed sequences "
                        "pass position_ids that restart at 0 per document and no attention_mask "
                        "(DataCollatorWithFlattening's default) instead of cu_seq_lens_* / seq_idx.")


@torch.no_grad()
def init_mesa_parameters(module: nn.Module, config) -> None:
    """The mesa parameters' initialisation (run by the models' ``_init_weights`` after the base init):

    * lambda = lambda_init: lambda_params = softplus^{-1}(lambda_init - lambda_min);
    * forget gate: zero weight, bias log(W_h - 1) so that 1 / (1 - gamma) = W_h, W_h log-spaced per head over
      ``forget_gate_windows`` (short- to long-memory heads);
    * input gate: zero weight and bias (beta = 1/2, which only rescales lambda);
    * short convolution: the current token only (y_t = SiLU(x_t)); output norm weight 1.
    """
    if isinstance(module, MesaAttention):
        init.constant_(module.lambda_params, math.log(math.expm1(config.lambda_init - config.lambda_min)))
        if module.f_proj is not None:
            shortest, longest = config.forget_gate_windows
            windows = torch.logspace(math.log10(shortest), math.log10(longest), module.num_kv_heads)
            init.zeros_(module.f_proj.weight)
            init.copy_(module.f_proj.bias, torch.log(windows - 1))
        if module.b_proj is not None:
            init.zeros_(module.b_proj.weight)
            init.zeros_(module.b_proj.bias)
    elif isinstance(module, MesaShortConvolution):
        init.zeros_(module.weight)
        init.constant_(module.weight[..., -1], 1.0)
    elif isinstance(module, MesaHeadRMSNorm):
        init.ones_(module.weight)


class WholeCheckpointMixin:
    """``from_pretrained`` that loads a checkpoint whole or not at all (HF only logs what it could not load).

    Missing, unexpected or mis-shaped weights raise (a plain OPT / Llama folder is pointed at ``from_base``). Config
    edits that keep every weight name and shape (an activation, ``mesa_rope``, a gate switched off, ...) are caught
    by ``weights_built_for``: ``save_pretrained`` writes the values of :attr:`structure_fields` the weights were
    built with into config.json, and loading compares them with the config the model is built from.
    """

    structure_fields: tuple[str, ...] = ()
    from_base: str = ""  # how to start from the plain base model, for the messages

    def structure(self) -> dict:
        """The config values that give the weights their meaning."""
        return {name: getattr(self.config, name, None) for name in self.structure_fields}

    def save_pretrained(self, *args, **kwargs):
        self.config.weights_built_for = self.structure()
        return super().save_pretrained(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        problems = {kind: sorted(map(str, info.get(kind) or ())) for kind in ("missing_keys", "unexpected_keys",
                                                                              "mismatched_keys")}
        problems = {kind: keys[:4] + ([f"... ({len(keys)} in all)"] if len(keys) > 4 else [])
                    for kind, keys in problems.items() if keys}
        if problems:
            plain = all(MESA_PARAMETERS.intersection(key.split(".")) for key in info.get("missing_keys") or ())
            hint = (f"it looks like a plain base-model checkpoint: start from it with {cls.from_base}"
                    if plain and not problems.keys() - {"missing_keys"} else
                    "check that config.json belongs to these weights and was not edited (mesa_layers, "
                    "short_conv_size, use_output_gate, ...)")
            raise ValueError(f"{cls.__name__}.from_pretrained({where!r}) would leave weights random or unused: "
                             f"{problems}; {hint}.")
        built_for = getattr(model.config, "weights_built_for", None)
        if built_for is not None:
            now = model.structure()
            changed = {k: (built_for.get(k), now[k]) for k in now if k in built_for and built_for[k] != now[k]}
            if changed:
                raise ValueError(f"{cls.__name__}.from_pretrained({where!r}): the weights were built for "
                                 + ", ".join(f"{k}={old!r}" for k, (old, _) in changed.items())
                                 + " but the config now says "
                                 + ", ".join(f"{k}={new!r}" for k, (_, new) in changed.items())
                                 + "; restore config.json (or drop the override), or convert again from the base "
                                   "model.")
        return (model, info) if output_loading_info else model


def mesa_model_from_base(model_class: type, base: nn.Module, **mesa_kwargs) -> nn.Module:
    """``model_class`` (a mesa CausalLM) with ``base``'s configuration plus ``mesa_kwargs``, every weight of ``base``
    (:func:`load_base_weights`), its device, dtype and generation config; in eval mode."""
    known = {f.name for f in dataclasses.fields(model_class.config_class)}
    unknown = sorted(set(mesa_kwargs) - known)
    if unknown:
        mesa_fields = known - {f.name for f in dataclasses.fields(type(base.config))}
        raise TypeError(f"Unknown config fields {unknown} for {model_class.__name__}; the mesa fields are "
                        f"{sorted(mesa_fields - {'layer_types'})} (and any field of {type(base.config).__name__}).")
    drop = {"model_type", "architectures", "transformers_version", "auto_map", "weights_built_for"}
    fields = {key: value for key, value in base.config.to_dict().items() if key not in drop}
    model = model_class(model_class.config_class(**{**fields, **mesa_kwargs})).to(device=base.device, dtype=base.dtype)
    load_base_weights(model, base)
    model.generation_config = base.generation_config
    return model.eval()


def load_base_weights(model: nn.Module, base: nn.Module) -> None:
    """Copy every weight of ``base`` into ``model`` (same names); raise unless exactly the mesa parameters are left."""
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    not_mesa = [key for key in missing if not MESA_PARAMETERS.intersection(key.split("."))]
    if unexpected or not_mesa:
        raise ValueError(f"{type(base).__name__} weights did not map onto {type(model).__name__}: unexpected "
                         f"{unexpected}, missing {not_mesa}.")


__all__ = ["MESA_PARAMETERS", "MesaAttention", "MesaInputs", "causal_lm_outputs", "prepare_mesa_inputs", "MesaHeadRMSNorm", "MesaShortConvolution", "MesaStateLayer",
           "check_forward_kwargs", "check_input_ids", "check_packed_inputs", "document_ids", "init_mesa_parameters",
           "load_base_weights", "mesa_cache", "mesa_model_from_base", "packed_document_starts"]
