"""TinT's blocks: one forward block and one backward block per simulated auxiliary layer, and what passes between
them (the prefix embeddings holding the layer's weights, the activations kept for the backward pass, the step's
context)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_tint import TinTConfig
from .prefix_updates import Prefix
from .simulated_modules import (
    LINEAR_SLOTS,
    NORM_SLOTS,
    TinTActivation,
    TinTLinearBackwardDescent,
    TinTLinearForward,
    TinTNorm,
    TinTSoftmaxAttention,
    mlp_chunks,
    mlp_slots,
)


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

    def segments_end_at(self, start: int) -> bool:
        """Whether no position from ``start`` on attends to one before it (packed segments ending there)."""
        return not self.allowed[:, :, start:, :start].any()

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

    def memory_numel(self, tokens: int) -> int:
        """Numbers one row's :class:`BlockMemory` holds for ``tokens`` positions: (T, d) per field, (C, T, d) for
        the MLP's chunked fields (``up`` only in gated MLPs)."""
        chunked = {"z", "s", "a"} | ({"up"} if self.gated else set())
        plain = [f.name for f in fields(BlockMemory) if f.name not in chunked | {"up"}]
        d, C = self.linear.d, self.prefixes["fc2"].shape[0]
        return (len(plain) + len(chunked) * C) * tokens * d

    def initial_prefixes(self, anchor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The learned prefix embeddings with a leading batch dimension of 1."""
        return self.prefixes(anchor)

    def forward(self, hidden: torch.Tensor, prefixes: dict[str, Prefix],
                context: StepContext) -> tuple[torch.Tensor, BlockMemory]:
        """hidden (B, T, d), prefixes from :meth:`initial_prefixes` or a backward block -> (hidden, memory)."""
        u, ln1_x_hat = self.norm(hidden, prefixes["ln1"])
        q, k = self.linear(u.unsqueeze(1), torch.stack(torch.broadcast_tensors(prefixes["q"], prefixes["k"]),
                                                       dim=1)).unbind(1)  # never updated: dense
        v = self.linear(u.unsqueeze(1), prefixes["v"].unsqueeze(1)).squeeze(1)
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

    def forward(self, grad: torch.Tensor, memory: BlockMemory, prefixes: dict[str, Prefix],
                context: StepContext) -> tuple[torch.Tensor, dict[str, Prefix]]:
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

    def factor_numel(self, tokens: int) -> dict[str, int]:
        """Numbers one row's update of each slot it updates holds as factors (:class:`FactoredPrefix`) after
        training on ``tokens`` positions, as :meth:`forward` builds them: lr dy per map and the maps' input
        (once when the maps share it), plus the bias and gain vectors. Q and K are never updated."""
        d, C, n = self.linear.d, self.chunks, tokens
        numel = {"ln1": 2 * d, "ln2": 2 * d, "v": 2 * n * d + d, "o": 2 * n * d + d,
                 "fc2": 2 * C * n * d + C * d, "fc1": (C + 1) * n * d + C * d}
        return numel | ({"gate": (C + 1) * n * d} if self.gated else {})

    def _single(self, dy: torch.Tensor, x: torch.Tensor, prefix: Prefix, lr: torch.Tensor):
        dx, new = self.linear(dy.unsqueeze(1), x.unsqueeze(1), prefix.unsqueeze(1), lr, update_bias=self.has_bias)
        return dx.squeeze(1), new.squeeze(1)
