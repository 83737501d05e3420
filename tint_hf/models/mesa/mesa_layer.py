"""The mesa-layer as a token mixer for HF decoder layers, shared by MesaOPT and MesaLlama: the mixer itself
(:class:`MesaAttention`), MesaNet's short convolution, the per-head output norm, the decode-cache layer of its state
(:class:`MesaStateLayer`) and the initialisation of its parameters. The op is :mod:`.mesa_op`.

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
states of a group are equal; the cache keeps them per query head. With ``mesa_window = w > 0`` the layer is a
within-layer hybrid: softmax over the last w tokens with the plain projections, the mesa layer over the older tokens
(:mod:`.mesa_window`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, CacheLayerMixin

from .mesa_op import MesaState, chunk_mesa, fla_available, fla_chunk_mesa, mesa_step, state_dtype
from .mesa_window import attention_scale, delay, window_attention, window_share

MESA_PARAMETERS = frozenset({"lambda_params", "f_proj", "b_proj", "o_norm", "g_proj", "q_conv1d", "k_conv1d",
                             "v_conv1d", "older_log_weight"})
"""Names of the parameters a mesa layer adds to the base attention (everything else is loaded from the base model)."""

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
        self.window: dict[str, torch.Tensor] | None = None  # mesa_window > 0: the last w tokens (see MesaAttention)
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
            self.window = None if self.window is None else {name: fn(t) for name, t in self.window.items()}

    def reset(self) -> None:
        self.h_state = self.s_state = self.conv_state = self.window = None
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
        self.window = config.mesa_window
        self.older_log_weight = nn.Parameter(torch.zeros(num_heads)) if self.window else None
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
                     attention_mask: torch.Tensor | None,
                     resets: torch.Tensor | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The plain projections q (B, T, heads * d), k and v (B, T, kv_heads * d), and the mesa part's: the same
        through the short convolutions when configured (their state read from and written to ``layer_cache``)."""
        plain = [proj(hidden_states) for proj in (self.q_proj, self.k_proj, self.v_proj)]
        if self.q_conv1d is None:
            return plain, plain
        sizes = [x.shape[-1] for x in plain]
        previous = None if layer_cache is None or layer_cache.conv_state is None else layer_cache.conv_state.split(sizes, -1)
        outputs, states = [], []
        for i, (conv, x) in enumerate(zip((self.q_conv1d, self.k_conv1d, self.v_conv1d), plain, strict=True)):
            y, new_state = conv(x, None if previous is None else previous[i], attention_mask, resets)
            outputs.append(y)
            states.append(new_state)
        if layer_cache is not None:
            layer_cache.conv_state = torch.cat(states, dim=-1)
        return plain, outputs

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
        plain, processed = self._projections(hidden_states, layer_cache, attention_mask, resets)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, T, n * d) -> (B, n, T, d)
            return x.view(bsz, length, -1, self.head_dim).transpose(1, 2)

        q, k, v = (heads(x) for x in processed)
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
        window = None
        if self.window:  # softmax over the last w tokens; the mesa part gets its inputs w tokens late
            q_plain, k_plain = heads(plain[0]), heads(plain[1])
            if position_embeddings is not None:
                q_plain, k_plain = rotate(q_plain, k_plain, *position_embeddings)
            window, (k, v, g, beta), older = self._window(q_plain, k_plain, heads(plain[2]), (k, v, g, beta),
                                                          attention_mask, resets, layer_cache)
        lam = F.softplus(self.lambda_params.to(dtype)) + self.config.lambda_min  # (kv_heads, d)
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # each key/value head (with its gates and lambda) serves its group of query heads
            k, v, g, beta = (x.repeat_interleave(group, dim=1) for x in (k, v, g, beta))
            lam = lam.repeat_interleave(group, dim=0)

        solver, cg_steps = self.config.mesa_solver, self.config.cg_steps
        if self.config.mesa_window_only:  # the control: no mesa part (its state stays empty)
            o = None
            state = state if state is not None else (None, q.new_zeros(bsz, self.num_heads, 1, 1))
        elif state is not None and length == 1:  # decoding: one recurrent step
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

        if o is not None:
            o = self.o_norm(o.to(dtype))                                                  # (B, heads, T, d)
            if self.g_proj is not None:
                o = o * F.silu(heads(self.g_proj(hidden_states)).to(dtype))
        if window is not None:  # the window alone (control), or both parts weighted by their attention mass
            softmax_out, lse = window
            if o is None:
                o = softmax_out
            else:
                share = window_share(lse, older, self.older_log_weight)
                o = share * softmax_out + (1 - share) * o
        o = o.transpose(1, 2).reshape(bsz, length, -1).to(hidden_states.dtype)              # (B, T, heads * d)
        return getattr(self, self.out_name)(o), None

    def _window(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesa_inputs: tuple[torch.Tensor, ...],
                attention_mask: torch.Tensor | None, resets: torch.Tensor | None,
                layer_cache: MesaStateLayer | None):
        """The window part and the delayed mesa inputs (:mod:`.mesa_window`).

        q (B, heads, T, d), k and v (B, kv_heads, T, d): the plain projections (RoPE'd); ``mesa_inputs``: the mesa
        part's k, v (B, kv_heads, T, d), g, beta (B, kv_heads, T). Returns ((softmax output (B, heads, T, d),
        log-normaliser L (B, heads, T, 1)), the mesa inputs delayed by w, the count n of older tokens (B, T)); the
        last w tokens and the count go to ``layer_cache``."""
        w, (bsz, _, length, _) = self.window, q.shape
        if resets is not None and layer_cache is not None:
            raise NotImplementedError("mesa_window with packed sequences (resets) takes no cache: call without one "
                                      "(training), or generate one sequence per row.")
        dtype = mesa_inputs[0].dtype
        real = (torch.ones(bsz, length, device=q.device) if attention_mask is None else attention_mask).to(dtype)
        history = layer_cache.window if layer_cache is not None and layer_cache.window is not None else None
        if history is None:  # nothing before the call: empty slots (not real, no mesa input)
            history = {"k": k.new_zeros(bsz, k.shape[1], w, k.shape[-1]), "v": v.new_zeros(bsz, v.shape[1], w, v.shape[-1]),
                       "real": real.new_zeros(bsz, w), "older": real.new_zeros(bsz),
                       **{f"mesa_{i}": x.new_zeros(*x.shape[:2], w, *x.shape[3:]) for i, x in enumerate(mesa_inputs)}}
        docs = document_ids(resets, bsz, length, q.device)
        docs = torch.cat([docs[:, :1].expand(-1, w), docs], dim=1)                             # (B, w + T)
        same_doc = docs[:, :length] == docs[:, w:]                  # token i - w is in i's document (B, T)
        delayed, new_history = [], {}
        for i, x in enumerate(mesa_inputs):
            x, new_history[f"mesa_{i}"] = delay(x, history[f"mesa_{i}"], same_doc)
            delayed.append(x)
        delayed_real, new_history["real"] = delay(real[:, None], history["real"][:, None], same_doc)
        new_history["real"] = new_history["real"][:, 0]
        older = _count_within_documents(delayed_real[:, 0], resets) + history["older"][:, None]  # (B, T)
        keys, values = torch.cat([history["k"], k], dim=2), torch.cat([history["v"], v], dim=2)  # (B, kv, w + T, d)
        new_history["k"], new_history["v"] = keys[:, :, -w:], values[:, :, -w:]
        group = self.num_heads // self.num_kv_heads
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        out = window_attention(q.to(dtype), keys.to(dtype), values.to(dtype), torch.cat([history["real"], real], 1),
                               docs, attention_scale(self.head_dim))
        if layer_cache is not None:
            new_history["older"] = older[:, -1]
            layer_cache.window = new_history
        return out, delayed, older


def _count_within_documents(x: torch.Tensor, resets: torch.Tensor | None) -> torch.Tensor:
    """Running sum of x (B, T) that restarts at every packed document (``resets``)."""
    total = x.cumsum(-1)
    if resets is None:
        return total
    before = total - x
    starts = resets.bool().clone()
    starts[:, 0] = True
    return total - torch.where(starts, before, torch.full_like(before, -1.0)).cummax(-1).values


@torch.no_grad()
def init_mesa_parameters(module: nn.Module, config) -> None:
    """The mesa parameters' initialisation (run by the models' ``_init_weights`` after the base init):

    * lambda = lambda_init: lambda_params = softplus^{-1}(lambda_init - lambda_min);
    * forget gate: zero weight, bias log(W_h - 1) so that 1 / (1 - gamma) = W_h, W_h log-spaced per head over
      ``forget_gate_windows`` (short- to long-memory heads);
    * input gate: zero weight and bias (beta = 1/2, which only rescales lambda);
    * short convolution: the current token only (y_t = SiLU(x_t)); output norm weight 1;
    * window (``mesa_window > 0``): older_log_weight mu = 0.
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
        if module.older_log_weight is not None:  # each token older than the window weighs exp(0) = 1 at first
            init.zeros_(module.older_log_weight)
    elif isinstance(module, MesaShortConvolution):
        init.zeros_(module.weight)
        init.constant_(module.weight[..., -1], 1.0)
    elif isinstance(module, MesaHeadRMSNorm):
        init.ones_(module.weight)


__all__ = ["MESA_PARAMETERS", "MesaAttention", "MesaHeadRMSNorm", "MesaShortConvolution", "MesaStateLayer",
           "document_ids", "init_mesa_parameters"]
