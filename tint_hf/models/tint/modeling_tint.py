"""TinT: a transformer whose forward pass simulates, fine-tunes and re-runs an auxiliary language model.

Panigrahi, Malladi, Xia, Arora, "Trainable Transformer in Transformer" (ICML 2024). One ``TinTForCausalLM``
forward pass on a sequence of T auxiliary tokens

1. runs the auxiliary forward pass (OPT, GPT-2 or Llama-family) with its weights read from prefix embeddings;
2. injects the gradient of the summed next-token loss over the *training part* at the final LayerNorm;
3. runs the approximate backward pass through the top ``n_simulation_layers`` layers, and in the same layers
   adds ``-inner_lr * sum_t dy_t x_t^T`` to the prefix embeddings (the simulated SGD step);
4. re-runs the top layers with the updated prefixes and predicts with them.

Layout. TinT works on P prefix rows of width D = d (r + 1) and T token rows. Prefix row j of a simulated d x d
linear map (W, b) holds r = d / P consecutive rows ``W[r j : r j + r]`` and one copy of b (read from prefix 0).
Token rows carry the auxiliary signal in their first d coordinates; the activations a backward module needs are
passed from its forward module along explicit skip edges (:class:`BlockMemory`) instead of reserved residual
channels, so token rows are stored d wide.

Modules (each a standard transformer operation; construction matrices are index operations, never dense):

* :class:`TinTLinearForward`: linear attention, token queries x_t split in s = d / P shards of width P, prefix
  keys (one weight head per row slot a and shard c); the value of prefix j places its score in coordinate r j + a.
  ``y = x W^T + b`` with exactly the FLOPs of the matrix product.
* :class:`TinTLinearBackwardDescent`: one layer with backward heads (token rows: ``dx = W^T dy``) and descent heads
  (prefix rows attend to training-part tokens: ``dW = sum_t dy_t x_t^T``).
* :class:`TinTNorm`: LayerNorm / RMSNorm as normalisation over the d signal coordinates, then a linear forward
  with diag(gamma) prefixes; its backward is TinT's finite difference ``N (f(x + g / N) - f(x))`` (or the exact VJP).
* :class:`TinTActivation`: the auxiliary non-linearity and its finite-difference backward (gated MLPs multiply
  it with the up projection, elementwise).
* :class:`TinTSoftmaxAttention`: causal softmax attention among token rows (prefix keys masked), one TinT head per
  auxiliary head (rotary positions rotate q and k; grouped K/V heads are shared), and its value-path backward
  ``dv_i = sum_j A_ji M_ij do_j`` (stop-gradient on the scores).
* :class:`TinTLossGradient`: softmax attention from each token to V vocabulary slots (keys and values = rows of
  the embedding matrix E), minus the next token's embedding: ``dy_t = E^T (softmax(E y_t) - e_{x_{t+1}})``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.utils.logging import tqdm

from .auxiliary import AuxiliarySpec, apply_rotary, auxiliary_spec, layer_key, read_auxiliary, rotary_cos_sin
from .configuration_tint import TinTConfig
from .dense_count import authors_dense_parameter_count
from .sequence_masks import TargetMasks, build_target_masks, default_position_ids, gradient_span, next_token_nll

LINEAR_SLOTS = ("q", "k", "v", "o")
GENERATION_ARGUMENTS = ("train_mask", "loss_mask", "segment_ids", "position_ids", "inner_lr", "logits_to_keep")
NORM_SLOTS = ("ln1", "ln2")


def mlp_slots(spec: AuxiliarySpec) -> tuple[str, ...]:
    """Prefix slots of the MLP, each with C = ceil(d_ff / d) chunks of d x d."""
    return (("gate",) if spec.gated_mlp else ()) + ("fc1", "fc2")


def mlp_chunks(spec: AuxiliarySpec) -> int:
    """C: the MLP is simulated as C chunks of d x d maps (d_ff is zero-padded up to C d, which is exact)."""
    return -(-spec.ffn_dim // spec.hidden_size)


# --------------------------------------------------------------------------------------------------------------
# Prefix layout
# --------------------------------------------------------------------------------------------------------------
def stack_into_prefixes(weight: torch.Tensor, bias: torch.Tensor, num_prefixes: int) -> torch.Tensor:
    """Store a d x d linear map in P prefix embeddings: (..., d, d), (..., d) -> (..., P, D = d (r + 1)).

    Prefix j holds rows ``r j .. r j + r - 1`` of ``weight`` side by side, then a copy of ``bias``.
    """
    d = weight.shape[-1]
    rows = weight.reshape(*weight.shape[:-2], num_prefixes, d * d // num_prefixes)
    return torch.cat([rows, bias.unsqueeze(-2).expand(*bias.shape[:-1], num_prefixes, d)], dim=-1)


def prefix_weight(prefix: torch.Tensor, d: int) -> torch.Tensor:
    """The d x d weight stored in prefixes (..., P, D)."""
    return prefix[..., : prefix.shape[-1] - d].reshape(*prefix.shape[:-2], d, d)


def prefix_bias(prefix: torch.Tensor, d: int) -> torch.Tensor:
    """The bias stored in prefixes (..., P, D): prefix 0's bias slot."""
    return prefix[..., 0, -d:]


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------
class TinTLinearForward(nn.Module):
    """y = x W^T + b as linear attention from token rows to the P prefix rows holding (W, b).

    Weight head (a, c) (a < r row slot, c < s = d / P input shard): query(t) = x_t[c P : (c + 1) P],
    key(j) = prefix_j[a d + c P : a d + (c + 1) P], value(j) = e_j, placed at output coordinate r j + a;
    the s shards of a row are summed. Bias head: query(t) = key(0) = e_0, value = prefix 0's bias slot.

    Shapes: x (B, G | 1, T, d), prefixes (B | 1, G, P, D) for G maps applied in parallel -> (B, G, T, d).
    """

    def __init__(self, d: int, num_prefixes: int):
        super().__init__()
        self.d, self.P = d, num_prefixes
        self.r = d // num_prefixes

    def keys(self, prefixes: torch.Tensor) -> torch.Tensor:
        """(B, G, P, D) -> weight-head keys (B, G, P, r, s, P)."""
        return prefixes[..., : self.r * self.d].unflatten(-1, (self.r, self.d // self.P, self.P))

    def forward(self, x: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        queries = x.unflatten(-1, (self.d // self.P, self.P))                           # (B, G, T, s, P)
        scores = torch.einsum("bgtcp,bgjacp->bgtja", queries, self.keys(prefixes))       # (B, G, T, P, r)
        return scores.flatten(-2) + prefix_bias(prefixes, self.d).unsqueeze(-2)


class TinTLinearBackwardDescent(TinTLinearForward):
    """Backward heads on token rows and descent heads on prefix rows, in one layer.

    Backward head (a, c): query(t) = dy_t at coordinates (a, r + a, ..., r (P-1) + a), key(j) = e_j,
    value(j) = prefix_j's (a, c) chunk: ``dx_t = W^T dy_t``.
    Descent head (a, c): query(j) = e_j, key(t) = the same strided dy_t, value(t) = -lr_t x_t[c P : (c + 1) P]
    where ``lr_t`` is the inner learning rate on training-part tokens and 0 elsewhere: prefix rows receive
    ``-lr sum_t dy_t x_t^T`` (bias heads: ``-lr sum_t dy_t`` into prefix 0's bias slot).

    Shapes: dy (B, G, T, d), x (B, G | 1, T, d), prefixes (B | 1, G, P, D), token_lr (B, T) ->
    dx (B, G, T, d), new prefixes (B, G, P, D).
    """

    def forward(self, dy: torch.Tensor, x: torch.Tensor, prefixes: torch.Tensor, token_lr: torch.Tensor,
                update_weight: bool = True, update_bias: torch.Tensor | bool = True) -> tuple[torch.Tensor, ...]:
        strided = dy.unflatten(-1, (self.P, self.r))                                     # (B, G, T, P, r)
        dx = torch.einsum("bgtja,bgjacp->bgtcp", strided, self.keys(prefixes)).flatten(-2)
        scaled = strided * token_lr[:, None, :, None, None].to(dy.dtype)
        B, G = dy.shape[:2]
        new = prefixes.expand(B, G, *prefixes.shape[-2:]).clone()
        if update_weight:
            queries = x.unflatten(-1, (self.d // self.P, self.P))                       # (B, G|1, T, s, P)
            delta = torch.einsum("bgtja,bgtcp->bgjacp", scaled, queries.expand(B, G, *queries.shape[2:]))
            new[..., : self.r * self.d] -= delta.flatten(-3)
        bias_delta = scaled.flatten(-2).sum(-2)                                          # (B, G, d)
        if isinstance(update_bias, torch.Tensor):                                        # per-map switch (G,)
            bias_delta = bias_delta * update_bias.to(bias_delta.dtype)[:, None]
        if update_bias is not False:
            new[..., 0, -self.d:] -= bias_delta
        return dx, new


def finite_difference(fn, x: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
    """TinT's first-order backward ``N (fn(x + g / N) - fn(x))`` (= J_fn(x) g for symmetric J_fn, up to O(1/N)).

    The difference cancels about log10(N) digits, so half-precision inputs are evaluated in float32 (in bf16, x + g/N
    would round back to x); float32 / float64 are used as they are.
    """
    work = torch.promote_types(x.dtype, torch.float32)
    x_, grad_ = x.to(work), grad.to(work)
    return (scale * (fn(x_ + grad_ / scale) - fn(x_))).to(x.dtype)


class TinTNorm(nn.Module):
    """LayerNorm / RMSNorm as normalisation over the d signal coordinates followed by a linear forward with
    diag(gamma) prefixes (and beta in the bias slot; zero for RMSNorm).

    Backward: ``g_hat = W^T dy = gamma * dy`` (linear backward), then the normalisation's VJP, either by TinT's
    finite difference ``N (f(x + g_hat / N) - f(x))`` (linear -> normalise -> linear) or exactly
    (LayerNorm: ``(g - mean(g) - x_hat mean(g x_hat)) / sigma``; RMSNorm: ``(g - x_hat mean(g x_hat)) / rms``).
    Descent: beta from ``-lr sum_t dy_t`` and, unless bias-only, the diagonal gamma from ``-lr sum_t dy_t x_hat_t``.
    """

    def __init__(self, spec: AuxiliarySpec, num_prefixes: int):
        super().__init__()
        self.d, self.P, self.eps, self.kind = spec.hidden_size, num_prefixes, spec.norm_eps, spec.norm
        self.affine = TinTLinearForward(self.d, num_prefixes)
        self.affine_backward = TinTLinearBackwardDescent(self.d, num_prefixes)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (self.d,), eps=self.eps)
        return F.layer_norm(x, (self.d,), eps=self.eps)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d), prefix (B | 1, P, D) -> (y, x_hat)."""
        x_hat = self.normalize(x)
        return self.affine(x_hat.unsqueeze(1), prefix.unsqueeze(1)).squeeze(1), x_hat

    def backward_descent(self, dy: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, prefix: torch.Tensor,
                         token_lr: torch.Tensor, bias_only: bool, mode: str,
                         fd_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        g_hat, new = self.affine_backward(dy.unsqueeze(1), x_hat.unsqueeze(1), prefix.unsqueeze(1), token_lr,
                                          update_weight=False, update_bias=self.kind == "layernorm")
        g_hat, new = g_hat.squeeze(1), new.squeeze(1)
        if not bias_only:  # gamma is a diagonal matrix: descend on its diagonal only
            gamma_delta = torch.einsum("btd,btd->bd", dy * token_lr.unsqueeze(-1).to(dy.dtype), x_hat)
            new = new - stack_into_prefixes(torch.diag_embed(gamma_delta), torch.zeros_like(gamma_delta), self.P)
        if mode == "fd":
            return finite_difference(self.normalize, x, g_hat, fd_scale), new
        projection = x_hat * (g_hat * x_hat).mean(-1, keepdim=True)
        if self.kind == "rmsnorm":
            return (g_hat - projection) / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps), new
        sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + self.eps)
        return (g_hat - g_hat.mean(-1, keepdim=True) - projection) / sigma, new


class TinTActivation(nn.Module):
    """The auxiliary non-linearity; backward ``N (act(z + g / N) - act(z))`` or exactly ``act'(z) g``."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.act = ACT2FN[name]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(z)

    def backward(self, grad: torch.Tensor, z: torch.Tensor, mode: str, fd_scale: float) -> torch.Tensor:
        if mode == "fd":
            return finite_difference(self.act, z, grad, fd_scale)
        with torch.enable_grad():
            z_ = z.detach().requires_grad_(True)
            (dz,) = torch.autograd.grad(self.act(z_), z_, grad)
        return dz


class TinTSoftmaxAttention(nn.Module):
    """Causal softmax attention among token rows; TinT head i simulates auxiliary head i.

    Forward: ``o = softmax(q k^T * scale + mask) v`` per head, with q and k rotated by the position angle for
    rotary families and the K/V heads shared by groups of query heads (GQA). Backward (value path, stop-gradient
    on the scores): the attention probabilities are recomputed from the stored q, k, transposed and masked by
    TinT's M: ``dv_i = sum_j A_ji dout_j`` over j = i or j in the training part, summed over each K/V group.
    Shapes: q (B, T, d); k, v (B, T, d) whose first d_kv coordinates are used; rotary (cos, sin) or None.
    """

    def __init__(self, spec: AuxiliarySpec):
        super().__init__()
        self.h, self.kv, self.dh, self.scale = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.attention_scale

    def heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """(B, T, >= n dh) -> (B, h, T, dh): the first n heads, each repeated for its h / n query heads."""
        t = t[..., : n * self.dh].unflatten(-1, (n, self.dh)).transpose(1, 2)
        return t.repeat_interleave(self.h // n, dim=1)

    def queries_keys(self, q: torch.Tensor, k: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = self.heads(q, self.h), self.heads(k, self.kv)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                rotary) -> torch.Tensor:
        q, k = self.queries_keys(q, k, rotary)
        out = F.scaled_dot_product_attention(q, k, self.heads(v, self.kv), attn_mask=allowed, scale=self.scale)
        return out.transpose(1, 2).flatten(-2)                                          # (B, T, d)

    def value_backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor,
                       train_tokens: torch.Tensor, rotary) -> torch.Tensor:
        """dout (B, T, d) at the attention output -> dv (B, T, d), zero beyond d_kv."""
        q, k = self.queries_keys(q, k, rotary)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        probs = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)  # (B, h, T, T)
        own = torch.eye(probs.shape[-1], dtype=torch.bool, device=probs.device)
        probs = torch.where(train_tokens[:, None, :, None] | own, probs, 0.0)             # TinT's mask M
        dv = probs.transpose(-1, -2) @ self.heads(dout, self.h)                         # (B, h, T, dh)
        dv = dv.unflatten(1, (self.kv, self.h // self.kv)).sum(2)                        # sum over each group
        dv = dv.transpose(1, 2).flatten(-2)
        return F.pad(dv, (0, dout.shape[-1] - dv.shape[-1]))


class TinTLossGradient(nn.Module):
    """Gradient of the summed next-token loss at the final-LN output y, on training targets only.

    ``ce``: softmax attention of y_t over V vocabulary slots (keys = values = rows of E) minus E[x_{t+1}];
    ``quad``: ``E^T E y_t - E[x_{t+1}]``; ``uniform``: ``mean_v E_v - E[x_{t+1}]``.
    Shapes: y (B, T, d), E (V, d), input_ids (B, T), train targets (B, T-1) -> dy (B, T, d).
    """

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, y: torch.Tensor, embedding: torch.Tensor, input_ids: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        b, t = targets.nonzero(as_tuple=True)          # only positions with a training target carry a gradient
        y_n = y[b, t]                                   # (N, d)
        if self.mode == "ce":
            predicted = (y_n @ embedding.T).softmax(-1) @ embedding
        elif self.mode == "quad":
            predicted = (y_n @ embedding.T) @ embedding
        else:
            predicted = embedding.mean(0).expand_as(y_n)
        grad = torch.zeros_like(y)
        grad[b, t] = predicted - F.embedding(input_ids[b, t + 1], embedding)
        return grad


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------
@dataclass
class BlockMemory:
    """Activations a forward block hands to its backward block (TinT's skip edges). All (B, T, d) except the
    MLP's, (B, C, T, d) for its C chunks: z (activation input), s = act(z), up (gated MLPs only), a (fc2 input)."""

    ln1_x: torch.Tensor
    ln1_x_hat: torch.Tensor
    u: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    attn: torch.Tensor
    ln2_x: torch.Tensor
    ln2_x_hat: torch.Tensor
    x2: torch.Tensor
    z: torch.Tensor
    s: torch.Tensor
    up: torch.Tensor | None
    a: torch.Tensor


@dataclass
class StepContext:
    """Per-call quantities shared by every block: masks and the inner learning rate per token."""

    allowed: torch.Tensor        # (B, 1, T, T) causal attention among real tokens
    train_tokens: torch.Tensor   # (B, T) bool: token in the training part
    token_lr: torch.Tensor       # (B, T) inner lr on training-part tokens, 0 elsewhere
    rotary: tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin) (B, 1, T, head_dim) for rotary families

    def select(self, rows: torch.Tensor, span: int) -> StepContext:
        """The context of the given rows, restricted to their first ``span`` positions."""
        rotary = None if self.rotary is None else tuple(t[rows, :, :span] for t in self.rotary)
        return StepContext(allowed=self.allowed[rows, :, :span, :span], train_tokens=self.train_tokens[rows, :span],
                           token_lr=self.token_lr[rows, :span], rotary=rotary)

    def window(self, start: int) -> StepContext:
        """The context of positions ``start:`` alone (exact only if they attend to nothing before ``start``)."""
        rotary = None if self.rotary is None else tuple(t[:, :, start:] for t in self.rotary)
        return StepContext(allowed=self.allowed[:, :, start:, start:], train_tokens=self.train_tokens[:, start:],
                           token_lr=self.token_lr[:, start:], rotary=rotary)


class TinTPrefixes(nn.Module):
    """One layer's prefix embeddings, one parameter per slot. TinT reads them by *calling* this module, which is
    what peft's ``LoraConfig(target_parameters=...)`` needs to apply an adapter to them."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.slots = tuple(shapes)
        for slot, shape in shapes.items():
            self.register_parameter(slot, nn.Parameter(torch.zeros(shape)))

    def __getitem__(self, slot: str) -> nn.Parameter:
        return getattr(self, slot)

    def forward(self, anchor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prefixes with a leading batch dimension of 1 (``anchor``, any tensor, is unused: peft's wrappers
        need one positional input)."""
        return {slot: getattr(self, slot).unsqueeze(0) for slot in self.slots}  # getattr: peft parametrizes them


class TinTForwardBlock(GradientCheckpointingLayer):
    """One simulated auxiliary layer: N1 -> QKV -> softmax attention -> O (+res) -> N2 -> MLP chunks (+res).

    Holds this layer's prefix embeddings: ``prefixes[slot]`` of shape (P, D) for ln1, q, k, v, o, ln2 and
    (C, P, D) for the C MLP chunks of fc1, fc2 (and gate for gated MLPs).
    """

    def __init__(self, config: TinTConfig):
        super().__init__()
        spec = config.aux_config_spec
        d, P, D = spec.hidden_size, config.num_prefixes, config.hidden_size
        self.gated = spec.gated_mlp
        self.prefixes = TinTPrefixes({slot: (P, D) for slot in NORM_SLOTS + LINEAR_SLOTS}
                                     | {slot: (mlp_chunks(spec), P, D) for slot in mlp_slots(spec)})
        self.linear = TinTLinearForward(d, P)
        self.norm = TinTNorm(spec, P)
        self.attention = TinTSoftmaxAttention(spec)
        self.activation = TinTActivation(spec.activation)

    def initial_prefixes(self, anchor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The learned prefix embeddings with a leading batch dimension of 1."""
        return self.prefixes(anchor)

    def forward(self, hidden: torch.Tensor, prefixes: dict[str, torch.Tensor],
                context: StepContext) -> tuple[torch.Tensor, BlockMemory]:
        """hidden (B, T, d), prefixes from :meth:`initial_prefixes` or a backward block -> (hidden, memory)."""
        u, ln1_x_hat = self.norm(hidden, prefixes["ln1"])
        qkv = torch.stack([prefixes[s].expand_as(prefixes["v"]) for s in ("q", "k", "v")], dim=1)
        q, k, v = self.linear(u.unsqueeze(1), qkv).unbind(1)
        attn = self.attention(q, k, v, context.allowed, context.rotary)
        after_attention = hidden + self.linear(attn.unsqueeze(1), prefixes["o"].unsqueeze(1)).squeeze(1)
        x2, ln2_x_hat = self.norm(after_attention, prefixes["ln2"])
        z = self.linear(x2.unsqueeze(1), prefixes["gate" if self.gated else "fc1"])       # (B, C, T, d)
        s = self.activation(z)
        up = self.linear(x2.unsqueeze(1), prefixes["fc1"]) if self.gated else None
        a = s * up if self.gated else s
        out = after_attention + self.linear(a, prefixes["fc2"]).sum(1)
        memory = BlockMemory(ln1_x=hidden, ln1_x_hat=ln1_x_hat, u=u, q=q, k=k, attn=attn, ln2_x=after_attention,
                             ln2_x_hat=ln2_x_hat, x2=x2, z=z, s=s, up=up, a=a)
        return out, memory


class TinTBackwardBlock(GradientCheckpointingLayer):
    """Backward and descent of one simulated layer (no parameters of its own: it reads and updates prefixes).

    In reverse order: fc2 / activation (x up) / fc1 (and gate) chunks, N2 (+res), O, attention value path, V,
    N1 (+res). Q and K are never updated and get no gradient (stop-gradient on the attention scores).
    """

    def __init__(self, config: TinTConfig):
        super().__init__()
        spec = config.aux_config_spec
        d, P = spec.hidden_size, config.num_prefixes
        self.linear = TinTLinearBackwardDescent(d, P)
        self.norm = TinTNorm(spec, P)
        self.attention = TinTSoftmaxAttention(spec)
        self.activation = TinTActivation(spec.activation)
        self.chunks, self.gated, self.has_bias = mlp_chunks(spec), spec.gated_mlp, spec.has_bias
        self.bias_only, self.mode, self.fd_scale = config.ln_bias_only, config.backward, config.fd_scale
        self.fc2_bias_bug = config.authors_fc2_bias_bug

    def forward(self, grad: torch.Tensor, memory: BlockMemory, prefixes: dict[str, torch.Tensor],
                context: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """grad (B, T, d) at the block output -> (grad at the block input, updated prefixes)."""
        lr, bias = context.token_lr, self.has_bias
        new = dict(prefixes)
        # MLP: every chunk starts from the block-output gradient. Only chunk 0 holds the fc2 bias and descends
        # on it (the authors' code lets all C chunks descend, i.e. C times the step).
        fc2_bias = torch.zeros(self.chunks, dtype=torch.bool, device=grad.device)
        fc2_bias[0] = bias
        fc2_bias[1:] = bias and self.fc2_bias_bug
        grad_a, new["fc2"] = self.linear(grad.unsqueeze(1).expand(-1, self.chunks, -1, -1), memory.a,
                                         prefixes["fc2"], lr, update_bias=fc2_bias)
        if self.gated:  # a = act(z) * up
            grad_z = self.activation.backward(grad_a * memory.up, memory.z, self.mode, self.fd_scale)
            grad_x2, new["fc1"] = self.linear(grad_a * memory.s, memory.x2.unsqueeze(1), prefixes["fc1"], lr,
                                              update_bias=bias)
            grad_gate, new["gate"] = self.linear(grad_z, memory.x2.unsqueeze(1), prefixes["gate"], lr,
                                                 update_bias=False)
            grad_x2 = grad_x2 + grad_gate
        else:
            grad_z = self.activation.backward(grad_a, memory.z, self.mode, self.fd_scale)
            grad_x2, new["fc1"] = self.linear(grad_z, memory.x2.unsqueeze(1), prefixes["fc1"], lr, update_bias=bias)
        grad_mid, new["ln2"] = self.norm.backward_descent(grad_x2.sum(1), memory.ln2_x, memory.ln2_x_hat,
                                                          prefixes["ln2"], lr, self.bias_only, self.mode,
                                                          self.fd_scale)
        grad = grad + grad_mid
        # Attention: O, the value path of the softmax, V, N1.
        grad_attn, new["o"] = self._single(grad, memory.attn, prefixes["o"], lr)
        grad_v = self.attention.value_backward(grad_attn, memory.q, memory.k, context.allowed,
                                               context.train_tokens, context.rotary)
        grad_u, new["v"] = self._single(grad_v, memory.u, prefixes["v"], lr)
        grad_in, new["ln1"] = self.norm.backward_descent(grad_u, memory.ln1_x, memory.ln1_x_hat, prefixes["ln1"],
                                                         lr, self.bias_only, self.mode, self.fd_scale)
        return grad + grad_in, new

    def _single(self, dy: torch.Tensor, x: torch.Tensor, prefix: torch.Tensor, lr: torch.Tensor):
        dx, new = self.linear(dy.unsqueeze(1), x.unsqueeze(1), prefix.unsqueeze(1), lr, update_bias=self.has_bias)
        return dx.squeeze(1), new.squeeze(1)


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TinTModelOutput(ModelOutput):
    """``last_hidden_state``: final-LN output after the simulated step(s) (B, T, d);
    ``hidden_state_before``: the same for the first (un-updated) simulated pass, if requested;
    ``eval_targets``: (B, T-1) bool, the positions whose next token is an evaluation target."""

    last_hidden_state: torch.Tensor | None = None
    hidden_state_before: torch.Tensor | None = None
    eval_targets: torch.Tensor | None = None


@dataclass
class TinTCausalLMOutput(ModelOutput):
    """``logits`` after the internal update; ``loss`` = mean NLL of ``labels`` on the evaluation part;
    ``logits_before`` / ``loss_before`` for the auxiliary model before the update, if requested."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    logits_before: torch.Tensor | None = None
    loss_before: torch.Tensor | None = None


class TinTPreTrainedModel(PreTrainedModel):
    config: TinTConfig
    config_class = TinTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = False  # the loss is a mean over evaluation targets; Trainer must scale it for accumulation
    _no_split_modules = ["TinTForwardBlock"]

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False,
                       dense_equivalent: bool = False) -> int:
        """Parameter count; ``dense_equivalent=True`` counts the construction the authors' way, with every
        selection / permutation matrix stored densely (1,669,324,018 for OPT-125M with block reuse)."""
        if not dense_equivalent:
            return super().num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        config, spec = self.config, self.config.aux_config_spec
        if spec.family not in ("opt", "gpt2"):
            raise ValueError(f"The authors' construction exists for OPT and GPT-2 only, not {spec.family!r}: "
                             "there is no dense-equivalent count to report.")
        return authors_dense_parameter_count(
            aux_family=spec.family, d=spec.hidden_size, n_aux_layers=spec.num_layers, n_aux_heads=spec.num_heads,
            d_ff=spec.ffn_dim, vocab_size=spec.vocab_size, max_positions=spec.max_positions, D=config.hidden_size,
            P=config.num_prefixes, H=config.num_attention_heads, n_simulation_layers=config.n_simulation_layers,
            n_steps=config.n_steps, reuse_forward_blocks=config.reuse_forward_blocks,
            reuse_backward_blocks=config.reuse_backward_blocks, position_offset=spec.position_offset,
        )["total"]

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses a checkpoint with missing, unexpected or mis-shaped
        weights (HF only logs them): TinT's weights *are* its construction, so a partial load (e.g. a config edited
        to another layer count) would silently simulate garbage."""
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        _refuse_partial_load(f"TinT checkpoint {args[0] if args else kwargs.get('pretrained_model_name_or_path')}",
                             info)
        return (model, info) if output_loading_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """A randomly initialised TinT is not a simulator: build one with ``TinTForCausalLM.from_auxiliary``."""
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


class TinTModel(TinTPreTrainedModel):
    """The simulator: embeddings, one forward block per auxiliary layer, the final LN prefix, the gradient module
    and a (parameter-free) backward block. Returns final-LN outputs; :class:`TinTForCausalLM` adds the LM head."""

    def __init__(self, config: TinTConfig):
        super().__init__(config)
        spec = config.aux_config_spec
        self.spec = spec
        d, P, D = spec.hidden_size, config.num_prefixes, config.hidden_size
        self.embed_tokens = nn.Embedding(spec.vocab_size, d)
        if spec.learned_positions:
            self.embed_positions = nn.Embedding(spec.max_positions + spec.position_offset, d)
        self.layers = nn.ModuleList(TinTForwardBlock(config) for _ in range(spec.num_layers))
        self.final_norm_prefix = nn.Parameter(torch.zeros(P, D))
        self.final_norm = TinTNorm(spec, P)
        self.loss_gradient = TinTLossGradient(config.loss_gradient)
        self.backward_block = TinTBackwardBlock(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                train_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inner_lr: float | torch.Tensor | None = None,
                return_hidden_before: bool = False, segment_ids: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> TinTModelOutput:
        """Arguments as :meth:`TinTForCausalLM.forward`; returns final-LN outputs of the kept positions."""
        masks = self.target_masks(input_ids, attention_mask, train_mask, loss_mask, position_ids, segment_ids)
        start = _window_start(masks, logits_to_keep)
        lr = self.step_sizes(inner_lr, input_ids.shape[0])  # (B, 1)
        n, L = self.config.n_simulation_layers, self.spec.num_layers
        hidden = self.embed_tokens(input_ids)
        rotary = None
        if self.spec.learned_positions:
            hidden = hidden + self.embed_positions(masks.position_ids + self.spec.position_offset)
        else:
            rotary = rotary_cos_sin(self.spec, masks.position_ids, hidden.dtype)
        context = StepContext(allowed=_causal_allowed(masks.attention_mask, masks.segment_ids),
                              train_tokens=masks.train_tokens,
                              token_lr=masks.train_tokens.to(hidden.dtype) * lr.to(hidden.dtype), rotary=rotary)
        for layer in self.layers[: L - n]:  # never updated: run once, reused by every later pass
            hidden, _ = layer(hidden, layer.initial_prefixes(hidden), context)
        continued = hidden
        prefixes = [layer.initial_prefixes(hidden) for layer in self.layers[L - n:]]
        final_prefix = self.final_norm_prefix.unsqueeze(0)
        hidden_before = None
        if return_hidden_before:
            hidden_before = self._output_pass(continued, prefixes, final_prefix, context, start)
        # The training loss depends only on the positions up to its last target (causal attention), and rows that
        # agree there receive the same update: the step runs once per distinct leading span (exact, and for a batch
        # of prompts sharing their demonstrations, once in all), then every row reads its group's prefixes.
        span = gradient_span(masks)
        if span > 1:
            rows, group = _distinct_rows(input_ids, masks, span, lr)
            step_context, step_ids = context.select(rows, span), input_ids[rows, :span]
            for _ in range(self.config.n_steps):
                y, memories, final_x_hat, final_x = self._simulated_forward(continued[rows, :span], prefixes,
                                                                            final_prefix, step_context)
                # Gradient module: loss gradient at the final-LN output, final LN backward + descent.
                grad = self.loss_gradient(y, self.embed_tokens.weight, step_ids, masks.train[rows, : span - 1])
                grad, final_prefix = self.final_norm.backward_descent(
                    grad, final_x, final_x_hat, final_prefix, step_context.token_lr, self.config.ln_bias_only,
                    self.config.backward, self.config.fd_scale)
                for i in reversed(range(n)):
                    grad, prefixes[i] = self.backward_block(grad, memories[i], prefixes[i], step_context)
            final_prefix = _per_row(final_prefix, group)
            prefixes = [{slot: _per_row(p, group) for slot, p in layer.items()} for layer in prefixes]
        y = self._output_pass(continued, prefixes, final_prefix, context, start)
        return TinTModelOutput(last_hidden_state=y, hidden_state_before=hidden_before, eval_targets=masks.eval[:, start:])

    def _output_pass(self, hidden, prefixes, final_prefix, context, start: int) -> torch.Tensor:
        """Final-LN outputs of positions ``start:``; when earlier segments are not needed, only those positions run."""
        if start > 0 and _segments_end_at(context, start):
            return self._simulated_forward(hidden[:, start:], prefixes, final_prefix, context.window(start))[0]
        return self._simulated_forward(hidden, prefixes, final_prefix, context)[0][:, start:]

    def _simulated_forward(self, hidden, prefixes, final_prefix, context):
        """The top layers (those the step updates) and the final LN, keeping each block's memory."""
        n, L = self.config.n_simulation_layers, self.spec.num_layers
        memories = []
        for layer, layer_prefixes in zip(self.layers[L - n:], prefixes):
            hidden, memory = layer(hidden, layer_prefixes, context)
            memories.append(memory)
        y, x_hat = self.final_norm(hidden, final_prefix)
        return y, memories, x_hat, hidden

    def default_train_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) bool: the first ``floor(config.default_train_fraction * n)`` of each row's n real tokens."""
        real = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        counts = real.sum(-1, keepdim=True)
        index = default_position_ids(real)
        return real.bool() & (index < (counts * self.config.default_train_fraction).floor().long())

    def step_sizes(self, inner_lr: float | torch.Tensor | None, batch: int) -> torch.Tensor:
        """The inner learning rate of every row, (B, 1) float64: ``config.inner_lr``, one number, or one per row."""
        lr = self.config.inner_lr if inner_lr is None else inner_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
            raise TypeError(f"inner_lr must be a number or a (batch,) tensor of numbers, got {type(lr).__name__}.")
        lr = torch.as_tensor(lr, dtype=torch.float64, device=self.embed_tokens.weight.device)
        if lr.dim() > 1 or (lr.dim() == 1 and lr.shape[0] != batch):
            raise ValueError(f"inner_lr must be a number or have one value per row, shape ({batch},); got shape "
                             f"{tuple(lr.shape)}.")
        if not torch.isfinite(lr).all():
            raise ValueError(f"inner_lr must be finite, got {lr.tolist()}.")
        return lr.expand(batch).reshape(batch, 1).contiguous()

    def target_masks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     train_mask: torch.Tensor | None, loss_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None, segment_ids: torch.Tensor | None = None) -> TargetMasks:
        """Validated masks of the call; without ``train_mask``, :meth:`default_train_mask`."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}; "
                             "use input_ids[None] for a single sequence.")
        vocab = self.spec.vocab_size
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise ValueError(f"input_ids must lie in [0, {vocab}) (the auxiliary vocabulary), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]; check the tokenizer.")
        if input_ids.shape[1] > self.spec.max_positions:
            raise ValueError(f"Sequence length {input_ids.shape[1]} exceeds the auxiliary model's "
                             f"{self.spec.max_positions} positions.")
        if position_ids is not None and (position_ids.min() < 0 or position_ids.max() >= self.spec.max_positions):
            raise ValueError(f"position_ids must lie in [0, {self.spec.max_positions}) (the auxiliary position "
                             f"table), got values in [{int(position_ids.min())}, {int(position_ids.max())}].")
        if train_mask is None:
            train_mask = self.default_train_mask(input_ids, attention_mask)
        return build_target_masks(input_ids, attention_mask, train_mask, loss_mask, position_ids, segment_ids)


def _distinct_rows(input_ids: torch.Tensor, masks: TargetMasks, span: int,
                   lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One representative row per group of rows identical on their first ``span`` positions (tokens, masks,
    positions, segments) and in their step size ``lr`` (B, 1), and each row's group index: (U,), (B,)."""
    parts = [input_ids[:, :span], masks.attention_mask[:, :span].long(), masks.train_tokens[:, :span].long(),
             masks.train[:, : span - 1].long(), masks.position_ids[:, :span], lr.view(torch.int64)]
    if masks.segment_ids is not None:
        parts.append(masks.segment_ids[:, :span])
    key = torch.cat(parts, dim=1)
    _, group = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.zeros(int(group.max()) + 1, dtype=torch.long, device=key.device)
    rows.scatter_(0, group, torch.arange(key.shape[0], device=key.device))
    return rows, group


def _window_start(masks: TargetMasks, logits_to_keep: int) -> int:
    """First position whose output is returned: ``T - logits_to_keep`` (every position for 0)."""
    length = masks.train_tokens.shape[1]
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0 keeps every position), got {logits_to_keep!r}.")
    return length - logits_to_keep if 0 < logits_to_keep < length else 0


def _segments_end_at(context: StepContext, start: int) -> bool:
    """Whether no position from ``start`` on attends to one before it (packed segments ending there)."""
    return not context.allowed[:, :, start:, :start].any()


def _per_row(prefix: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Prefixes of the U groups (U, ...) -> of the B rows; shared ones (leading dim 1) stay shared."""
    return prefix if prefix.shape[0] == 1 else prefix[group]


def _causal_allowed(attention_mask: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) real-token mask -> (B, 1, T, T) causal mask among real tokens (padded rows attend to themselves),
    restricted to each token's own segment when ``segment_ids`` (B, T) is given."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    allowed = causal & attention_mask[:, None, None, :].bool()
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return allowed | eye


class TinTForCausalLM(TinTPreTrainedModel, GenerationMixin):
    """TinT with its LM head (tied to the auxiliary token embedding). See the module docstring."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinTConfig):
        super().__init__(config)
        self.model = TinTModel(config)
        spec = config.aux_config_spec
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                train_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                inner_lr: float | torch.Tensor | None = None, return_logits_before: bool = False,
                segment_ids: torch.Tensor | None = None, logits_to_keep: int = 0, use_cache: bool | None = None,
                return_dict: bool | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None) -> TinTCausalLMOutput | tuple:
        """One TinT pass: simulate, fine-tune on the training part, predict.

        Args:
            input_ids, attention_mask, position_ids: (B, T) auxiliary tokens, padding (either side; 0/1 values),
                positions.
            train_mask: (B, T) 1 on the training part; default: the first ``config.default_train_fraction`` of
                each sequence's real tokens.
            loss_mask: (B, T) optional restriction of the training targets (e.g. label words only).
            labels: (B, T) targets (usually ``input_ids``); the loss is their mean NLL over evaluation targets
                (an error if the call has none, e.g. a ``train_mask`` of all ones).
            inner_lr: overrides ``config.inner_lr`` for this call: one finite number, or a (B,) tensor with one
                step size per row.
            return_logits_before: also return the logits (and loss) of the auxiliary model before the step.
            segment_ids: (B, T) optional packing of separate sequences into one row (numbered in order): tokens
                attend within their segment only, positions restart per segment. Demonstrations as training segments
                and a query as the last, evaluation segment give the single-FT variant in one pass (one step on the
                summed loss of the separate demonstrations, then the query alone with the updated weights).
            logits_to_keep: return the logits of the last ``logits_to_keep`` positions only (0: all), and the loss on
                them. When those positions form whole segments, the output pass runs on them alone.
            use_cache: accepted for ``generate()``; TinT keeps no cache (each call simulates the whole sequence).
            return_dict: ``False`` returns ``output.to_tuple()`` (default ``config.return_dict``).
            output_hidden_states, output_attentions: not available (TinT's internal states are not the auxiliary
                model's); ``True`` raises.
        """
        for name, flag in (("output_hidden_states", output_hidden_states), ("output_attentions", output_attentions)):
            if flag:
                raise ValueError(f"TinTForCausalLM does not return {name.removeprefix('output_')}; drop {name}=True.")
        out = self.model(input_ids, attention_mask, train_mask, loss_mask, position_ids, inner_lr,
                         return_hidden_before=return_logits_before, segment_ids=segment_ids,
                         logits_to_keep=logits_to_keep)
        logits = self.lm_head(out.last_hidden_state)
        logits_before = self.lm_head(out.hidden_state_before) if return_logits_before else None
        loss = loss_before = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                                 f"{tuple(labels.shape)}.")
            labels = labels[:, input_ids.shape[1] - logits.shape[1]:]
            loss = _eval_loss(logits, labels, out.eval_targets)
            if logits_before is not None:
                loss_before = _eval_loss(logits_before, labels, out.eval_targets)
        output = TinTCausalLMOutput(loss=loss, logits=logits, logits_before=logits_before, loss_before=loss_before)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """``GenerationMixin.generate`` with TinT's arguments (``train_mask``, ``loss_mask``, ``segment_ids``,
        ``inner_lr``, ``position_ids``) passed to every step; masks grow with the generated tokens, which are never
        training tokens. Without ``train_mask`` the training part is :meth:`TinTModel.default_train_mask` of the
        *prompt*, fixed for the whole generation. Every step re-runs the simulation on the sequence so far."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if kwargs.get("train_mask") is None and prompt is not None:
            kwargs["train_mask"] = self.model.default_train_mask(prompt, kwargs.get("attention_mask"))
        return super().generate(inputs, generation_config, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        """The whole sequence so far (no cache) and the call's TinT arguments."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        inputs.update({name: kwargs[name] for name in GENERATION_ARGUMENTS if kwargs.get(name) is not None})
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, is_encoder_decoder: bool = False,
                                            num_new_tokens: int = 1) -> dict:
        """HF's update (attention mask, positions), then the TinT masks over the new tokens: ``train_mask`` and
        ``loss_mask`` 0, ``segment_ids`` those of the last segment."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        for name in ("train_mask", "loss_mask", "segment_ids"):
            if (mask := model_kwargs.get(name)) is not None:
                new = mask[:, -1:].expand(-1, num_new_tokens) if name == "segment_ids" else mask.new_zeros(
                    mask.shape[0], num_new_tokens)
                model_kwargs[name] = torch.cat([mask, new], dim=-1)
        return model_kwargs

    @classmethod
    def from_auxiliary(cls, model_or_path: nn.Module | str, dtype: torch.dtype | None = None,
                       progress: bool = False, **construction) -> TinTForCausalLM:
        """Construct TinT from an auxiliary OPT / GPT-2 / Llama model (an instance, a local folder or a Hub id).

        ``construction`` holds :class:`TinTConfig` fields (num_prefixes, n_simulation_layers, inner_lr, ...).
        The prefix embeddings receive the auxiliary weights; nothing else needs values. ``progress`` shows a
        progress bar over the layers.
        """
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            aux, info = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=dtype or torch.float32,
                                                             output_loading_info=True)
            _refuse_partial_load(f"auxiliary checkpoint {model_or_path}", info)
            construction.setdefault("aux_model_id", str(model_or_path))
        else:
            aux = model_or_path
        auxiliary_spec(aux.config)  # clear error for unsupported families before anything else
        config = TinTConfig(aux_config=aux.config.to_dict(), **construction)
        spec, weights = read_auxiliary(aux)
        target_dtype = dtype or weights["embed_tokens"].dtype
        model = cls(config).to(target_dtype)
        with torch.no_grad():
            load_auxiliary_into(model.model, spec, config.num_prefixes, weights, progress)
        model.tie_weights()
        return model.eval()


def load_auxiliary_into(model: TinTModel, spec: AuxiliarySpec, num_prefixes: int,
                        weights: dict[str, torch.Tensor], progress: bool = False) -> None:
    """Write canonical auxiliary weights (see ``auxiliary.py``) into TinT's embeddings and prefix embeddings.

    Every simulated map is d x d: K/V maps of grouped-query attention get zero rows below their d_kv outputs,
    and the MLP is zero-padded to C d hidden units; padded rows stay zero under the simulated step (their
    gradients vanish), so the padding is exact. Missing biases are zero and never updated.
    """
    d, P, chunks = spec.hidden_size, num_prefixes, mlp_chunks(spec)

    def get(name: str, rows: int, cols: int | None = None) -> torch.Tensor:
        """Weight or bias ``name`` zero-padded to ``rows`` (x ``cols``); zeros if the family has no such bias."""
        ref = weights["embed_tokens"]
        if name not in weights:
            return torch.zeros(rows, dtype=ref.dtype, device=ref.device)
        tensor = weights[name]
        pad = [0, (cols or tensor.shape[-1]) - tensor.shape[-1]] if tensor.dim() == 2 else []
        return F.pad(tensor, pad + [0, rows - tensor.shape[0]])

    def norm_prefix(name: str) -> torch.Tensor:
        return stack_into_prefixes(torch.diag(get(f"{name}.weight", d)), get(f"{name}.bias", d), P)

    model.embed_tokens.weight.copy_(weights["embed_tokens"])
    if spec.learned_positions:
        model.embed_positions.weight.copy_(weights["embed_positions"])
    model.final_norm_prefix.copy_(norm_prefix("final_norm"))
    for i, block in enumerate(tqdm(model.layers, desc="Constructing TinT layers", disable=not progress)):
        for slot in NORM_SLOTS:
            block.prefixes[slot].copy_(norm_prefix(layer_key(i, slot)))
        for slot in LINEAR_SLOTS:
            key = layer_key(i, slot)
            block.prefixes[slot].copy_(stack_into_prefixes(get(f"{key}.weight", d), get(f"{key}.bias", d), P))
        for slot in mlp_slots(spec):
            key = layer_key(i, slot)
            if slot == "fc2":   # (d, C d): chunk c is a block of columns; the bias lives in chunk 0
                weight = get(f"{key}.weight", d, chunks * d).unflatten(1, (chunks, d)).transpose(0, 1)
                bias = torch.zeros(chunks, d, dtype=weight.dtype, device=weight.device)
                bias[0] = get(f"{key}.bias", d)
            else:               # (C d, d): chunk c is a block of rows
                weight = get(f"{key}.weight", chunks * d).unflatten(0, (chunks, d))
                bias = get(f"{key}.bias", chunks * d).unflatten(0, (chunks, d))
            block.prefixes[slot].copy_(stack_into_prefixes(weight, bias, P))


def _refuse_partial_load(what: str, info: dict) -> None:
    """Raise if ``from_pretrained``'s loading info reports weights that were not loaded exactly."""
    problems = {kind: sorted(map(str, info.get(kind) or ())) for kind in ("missing_keys", "unexpected_keys",
                                                                          "mismatched_keys")}
    problems = {kind: keys[:5] + (["..."] if len(keys) > 5 else []) for kind, keys in problems.items() if keys}
    if problems:
        raise ValueError(f"The {what} does not match its config: {problems}. Check that config.json belongs to "
                         "these weights (and was not edited), or rebuild with TinTForCausalLM.from_auxiliary.")


def _eval_loss(logits: torch.Tensor, labels: torch.Tensor, eval_targets: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``labels`` at evaluation targets (B, T-1) (labels equal to -100 are ignored)."""
    valid = eval_targets & (labels[:, 1:] != -100)
    if not valid.any():
        raise ValueError("No evaluation target for the loss: every predicted token is in the training part (or its "
                         "label is -100). Leave part of each sequence out of train_mask, or drop labels.")
    nll = next_token_nll(logits, labels.clamp(min=0))
    return (nll * valid).sum() / valid.sum()
