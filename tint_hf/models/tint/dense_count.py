"""Closed-form parameter count of TinT as the authors' reference constructor allocates it.

The reference implementation of TinT (Panigrahi et al. 2023,
github.com/abhishekpanigrahi1996/transformer_in_transformer, ``tint_main/``) stores every
construction matrix as a dense ``nn.Parameter``: 0/1 selections, permutations, stacked identity
matrices, position projections and gates.  Our re-implementation stores those matrices
structurally (index operations), so its ``num_parameters()`` is far smaller.  To compare model
sizes with the paper ("TinT for OPT-125M has < 2B parameters") we need the count "the authors'
way"; :func:`authors_dense_parameter_count` gives it in closed form, without building anything.

Notation (all integers):

* auxiliary model: width ``d``, ``L = num_aux_layers`` layers, ``h = num_aux_heads`` heads, MLP width
  ``d_ff`` (split into ``m = d_ff / d`` chunks), vocabulary ``V``, ``T = max_positions``;
* TinT: width ``D``, ``P`` prefix tokens, ``H`` softmax heads of dim ``h_s = D / H``;
* ``H_l = D / P``: heads of the linear-attention modules (their head dim is ``P``);
* ``T_p = T + P``: width of the one-hot position stream fed to every layer;
* ``G = 2 (T_p + 1)``: one *gate* module = two ``T_p -> 1`` affine maps (weight + bias each).

Dense building blocks (each count is weight + bias of every tensor the module registers):

* ``Conv2D(nf, nx)`` (per-channel ``nx x nx`` maps): ``nf·nx·(nx + 1)``; the *transposed* variant
  (an ``nf x nf`` channel-mixing map repeated for every in-channel offset) ``nf·nx·(nf + 1)``.
  Both act on the full width ``D = nf·nx``, so they cost ``D·(nx + 1)`` and ``D·(nf + 1)``.
* A q/k/v map of an attention module with channel size ``c`` is a ``Conv2D(D/c, c)`` followed by a
  transposed ``Conv2D(D/c, c)``: ``D·(c + D/c + 2)``.  By default ``c`` is the head dim.
* Every attention module also has a position projection ``p_attn`` (``T_p -> 3·head_dim``, dense,
  ``3·head_dim·(T_p + 1)``) and a per-head position router ``p_expand`` (``4·n_heads``).

Modules (``LF`` = linear forward, ``LB`` = linear backward, ``LD`` = linear descent):

* ``LF`` (y = W x + b, simulated by linear attention with ``H_l`` heads of dim ``P``):
  q/k/v ``3·D·(P + H_l + 2)`` + ``p_attn`` ``3·P·(T_p + 1)`` + ``p_expand`` ``4·H_l`` + shard-summing
  output map ``c_proj`` (transposed Conv2D) ``D·(H_l + 1)`` + row-order permutation
  ``Conv2D(D/d, d)`` ``D·(d + 1)`` + bias-adding transposed ``Conv2D(D/d, d)`` ``D·(D/d + 1)`` +
  one gate ``G``.  (If ``d`` does not divide ``D`` the constructor uses a dense ``D x D``
  ``c_proj`` ``D² + D`` instead of the three output maps; supported for completeness.)
* ``LB`` and ``LD`` (backward ``Wᵀ ∂y`` / descent ``W -= η Σ ∂y xᵀ``) have the same size: one
  linear attention whose query (LB) or key (LD) map uses channel size ``d``
  ``D·(d + D/d + 2)``, the other two maps ``2·D·(P + H_l + 2)``, ``p_attn`` ``3·P·(T_p + 1)``,
  ``p_expand`` ``4·H_l``, ``c_proj`` ``D·(H_l + 1)`` and a gate ``G``.
* ``SA`` (the softmax attention core, ``H`` heads of dim ``h_s``): q/k/v ``3·D·(h_s + H + 2)`` +
  ``p_attn`` ``3·h_s·(T_p + 1)`` + ``p_expand`` ``4·H`` + ``c_proj`` ``D·(H + 1)``.
* ``C = D·(H + 1)``: one transposed ``Conv2D(H, h_s)`` per-token map (the ``c_fc`` / ``proj_fc``
  of the finite-difference backward modules).

Composite modules:

* LayerNorm forward = ``LF + G`` (the normalisation gate); attention forward = ``LF + G + SA``
  (one LF shared by Q, K and V); activation forward = ``C + D·(h_s + 1) + G``
  (transposed + plain Conv2D and a gate); activation backward = ``2·C``;
  LayerNorm backward+descent = ``LB + 2·C + G + LD``; linear backward+descent = ``LB + LD``;
  attention backward+descent = ``G + SA + LB + LD``.

Per block:

* forward block, construction weights: ``6·LF + 4·G + SA + D·(H + 1) + D·(h_s + 1)``
  (LN1, attention, O, LN2, fc1-chunk, activation, fc2-chunk; the three MLP modules are shared by
  the ``m`` chunks);
* forward block, prefix tensors (only in the first-pass blocks): ``(6 + 3·m)`` tensors of
  ``P x D`` (LN1, Q, K, V, O, LN2 and per chunk fc1 / activation placeholder / fc2);
* backward block: ``12·LB + 6·C + 3·G + SA``;
* gradient module (final-LN forward + final-LN backward/descent + its one prefix tensor):
  ``LF + 2·LB + 2·C + 2·G + P·D``.

Whole model: ``V·d`` (tied ``wte``/``lm_head``; ``+V·d`` if untied) + ``(T + offset)·d``
(positions; OPT offset 2, GPT-2 0) + ``L`` first-pass forward blocks (with prefixes) + gradient
module + ``n`` backward blocks (``n·num_steps`` without backward reuse) + ``n·num_steps`` extra
forward blocks without prefixes (only without forward reuse).

Measured reference values (``sum(p.numel() for p in model.parameters())`` of the authors' TinT
built by ``TinT_opt`` / ``TinT_gpt`` from commit 1722081 on a randomly initialised HF auxiliary
model, torch 2.13 CPU + transformers 4.49, in a scratch directory outside this repository) are
listed in ``tests/test_dense_count.py`` together with the configurations that produced them; this
module reproduces all of them exactly.  With D=3072, P=256, H=12 and one step:

* OPT-125M: 1,669,324,018 (n=12, reuse), 2,212,104,610 (n=12, no reuse), 996,400,372 (n=3, reuse);
  one forward block 59,387,492 (prefixes 14,155,776), backward block 74,769,294, gradient module
  19,259,290;
* GPT-2 (124M): 1,476,796,914 (n=12, reuse), 1,953,271,458 (n=12, no reuse), 896,162,292 (n=3,
  reuse); forward block 53,861,988, backward block 64,514,958, gradient module 16,889,754.  GPT-2 is
  smaller only because its position stream is 1024 + 256 wide instead of 2048 + 256 and its
  position table has no offset (and V = 50257).
"""

from __future__ import annotations

__all__ = ["authors_dense_parameter_count", "OPT_125M_DENSE_TOTAL_REUSE", "GPT2_DENSE_TOTAL_REUSE"]

#: The authors' OPT-125M TinT (D=3072, P=256, H=12, n=12, one step, forward/backward reuse).
OPT_125M_DENSE_TOTAL_REUSE = 1_669_324_018
#: The authors' GPT-2 (124M) TinT with the same TinT settings.
GPT2_DENSE_TOTAL_REUSE = 1_476_796_914

_POSITION_OFFSETS = {"opt": 2, "gpt2": 0}


def _family(aux_family: str) -> str:
    """Normalise the auxiliary family name (``"opt"`` or ``"gpt2"``)."""
    name = aux_family.lower().replace("-", "").replace("_", "")
    if name.startswith("opt"):
        return "opt"
    if name.startswith("gpt2"):
        return "gpt2"
    raise ValueError(f"unsupported auxiliary family {aux_family!r}; the authors' code supports 'opt' and 'gpt2'")


def _check(cond: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``cond`` holds (mirrors the constructor's asserts)."""
    if not cond:
        raise ValueError(message)


def _validate(*, d: int, num_aux_layers: int, num_aux_heads: int, d_ff: int, D: int, P: int, H: int,
              num_simulation_layers: int, num_steps: int) -> None:
    """Reject shapes for which the authors' constructor would fail its asserts."""
    for name, value in (("d", d), ("num_aux_layers", num_aux_layers), ("num_aux_heads", num_aux_heads), ("d_ff", d_ff),
                        ("D", D), ("P", P), ("H", H), ("num_steps", num_steps)):
        _check(value > 0, f"{name} must be positive, got {value}")
    _check(1 <= num_simulation_layers <= num_aux_layers,
           f"num_simulation_layers must lie in [1, num_aux_layers={num_aux_layers}], got {num_simulation_layers}")
    _check(D % P == 0, f"D={D} must be a multiple of P={P}")
    _check(d % P == 0, f"d={d} must be a multiple of P={P}")
    rows = d // P  # weight rows stacked per prefix, and heads each row is sharded over
    _check(D >= d * rows, f"D={D} must hold d*(d/P)={d * rows} weight entries per prefix")
    _check(D // P >= rows * rows + rows,
           f"D/P={D // P} linear-attention heads < (d/P)^2 + d/P = {rows * rows + rows} weight + bias heads")
    _check(D >= 4 * d, f"D={D} < 4d={4 * d}: no room for the backward-pass memory")
    _check(D % H == 0, f"D={D} must be a multiple of H={H}")
    head_dim = D // H
    _check(d % head_dim == 0, f"d={d} must be a multiple of the TinT head dim D/H={head_dim}")
    _check(num_aux_heads <= H, f"auxiliary heads h={num_aux_heads} exceed TinT heads H={H}")
    _check(num_aux_heads % (d // head_dim) == 0,
           f"auxiliary heads h={num_aux_heads} must be a multiple of d/(D/H)={d // head_dim}")
    _check(d_ff % d == 0, f"d_ff={d_ff} must be a multiple of d={d} (the MLP is simulated in d-wide chunks)")


def authors_dense_parameter_count(
    *,
    aux_family: str,
    d: int,
    num_aux_layers: int,
    num_aux_heads: int,
    d_ff: int,
    vocab_size: int,
    max_positions: int,
    D: int,
    P: int,
    H: int,
    num_simulation_layers: int,
    num_steps: int = 1,
    reuse_forward_blocks: bool = True,
    reuse_backward_blocks: bool = True,
    position_offset: int | None = None,
    tie_word_embeddings: bool = True,
) -> dict[str, int]:
    """Count the parameters of the authors' dense TinT construction in closed form.

    Args:
        aux_family: ``"opt"`` (``TinT_opt``) or ``"gpt2"`` (``TinT_gpt``).
        d: auxiliary hidden size.
        num_aux_layers: auxiliary layers ``L``; every one gets a first-pass forward block.
        num_aux_heads: auxiliary attention heads (only validated; it does not change the count).
        d_ff: auxiliary MLP width (must be a multiple of ``d``).
        vocab_size: auxiliary vocabulary size ``V`` (50272 for OPT-125M, 50257 for GPT-2).
        max_positions: auxiliary ``max_position_embeddings`` ``T`` (2048 for OPT, 1024 for GPT-2);
            the constructor also sizes its position stream as ``T + P``.
        D: TinT hidden size (``hidden_size``).
        P: number of prefix tokens (``num_prefixes``).
        H: TinT softmax-attention heads (``num_attention_heads``).
        num_simulation_layers: number ``n`` of top auxiliary layers that are updated.
        num_steps: simulated SGD steps (``n_forward_backward``).
        reuse_forward_blocks: the second forward passes reuse the first-pass blocks.
        reuse_backward_blocks: steps after the first reuse the first step's backward blocks.
        position_offset: extra rows of the learned position table; ``None`` takes the family
            default (OPT 2, GPT-2 0).
        tie_word_embeddings: whether ``lm_head`` shares ``wte`` (true for OPT-125M and GPT-2).

    Returns:
        A dict with ``"total"`` and its parts: ``"embeddings"`` (wte, plus lm_head if untied),
        ``"positions"``, ``"forward_block"`` (one first-pass block) split into
        ``"forward_block_prefixes"`` and ``"forward_block_construction"``, ``"backward_block"``,
        ``"gradient_module"``, the block counts ``"n_forward_blocks_with_prefixes"``,
        ``"n_forward_blocks_without_prefixes"``, ``"n_backward_blocks"``, ``"n_prefix_tensors_per_block"``,
        and the module sizes ``"linear_forward"``, ``"linear_backward"`` (= linear descent),
        ``"softmax_attention"``, ``"gate"``.

    Raises:
        ValueError: for shapes the authors' constructor rejects, or an unknown family.
    """
    family = _family(aux_family)
    _validate(d=d, num_aux_layers=num_aux_layers, num_aux_heads=num_aux_heads, d_ff=d_ff, D=D, P=P, H=H,
              num_simulation_layers=num_simulation_layers, num_steps=num_steps)
    offset = _POSITION_OFFSETS[family] if position_offset is None else position_offset
    _check(offset >= 0, f"position_offset must be >= 0, got {offset}")
    _check(vocab_size > 0 and max_positions > 0, "vocab_size and max_positions must be positive")

    h_lin = D // P  # linear-attention heads (head dim P)
    h_soft = D // H  # softmax-attention head dim
    t_pos = max_positions + P  # width of the one-hot position stream
    n_chunks = d_ff // d  # the MLP is simulated as d_ff/d chunks of d -> d linears

    gate = 2 * (t_pos + 1)  # two T_p -> 1 affine maps

    def qkv_map(channel: int) -> int:
        """Per-channel Conv2D followed by a transposed (channel-mixing) Conv2D on width D."""
        return D * (channel + D // channel + 2)

    def position_terms(head_dim: int, n_heads: int) -> int:
        """Dense position projection T_p -> 3*head_dim plus the per-head q/k/v position router."""
        return 3 * head_dim * (t_pos + 1) + 4 * n_heads

    # Linear forward: linear attention (q/k/v with channel P), shard-summing c_proj, then the row
    # permutation and bias-adding Conv2Ds when d divides D (otherwise one dense D x D c_proj).
    if D % d == 0:
        lf_output = D * (h_lin + 1) + D * (d + 1) + D * (D // d + 1)
    else:
        lf_output = D * D + D
    linear_forward = 3 * qkv_map(P) + position_terms(P, h_lin) + lf_output + gate
    # Linear backward and linear descent: one q (resp. k) map with channel d, two with channel P.
    linear_backward = qkv_map(d) + 2 * qkv_map(P) + position_terms(P, h_lin) + D * (h_lin + 1) + gate
    linear_descent = linear_backward
    # Softmax attention core with H heads (forward and transposed-score backward alike).
    softmax_attention = 3 * qkv_map(h_soft) + position_terms(h_soft, H) + D * (H + 1)
    token_map = D * (H + 1)  # transposed Conv2D(H, D/H): c_fc / proj_fc of the finite differences

    layernorm_forward = linear_forward + gate
    attention_forward = linear_forward + gate + softmax_attention
    activation_forward = token_map + D * (h_soft + 1) + gate
    forward_construction = (2 * layernorm_forward + attention_forward + linear_forward  # LN1, attn, O, LN2
                            + linear_forward + activation_forward + linear_forward)  # fc1, act, fc2 (shared)

    n_prefix_tensors = 6 + 3 * n_chunks
    forward_prefixes = n_prefix_tensors * P * D

    linear_back_descent = linear_backward + linear_descent
    layernorm_back_descent = linear_backward + 2 * token_map + gate + linear_descent
    attention_back_descent = gate + softmax_attention + linear_back_descent
    activation_backward = 2 * token_map
    backward_block = (3 * linear_back_descent + activation_backward  # fc2, act, fc1 (shared), O
                      + 2 * layernorm_back_descent + attention_back_descent)  # LN2, LN1, attention + V

    gradient_module = layernorm_forward + layernorm_back_descent + P * D

    n = num_simulation_layers
    n_backward_blocks = n if reuse_backward_blocks else n * num_steps
    n_plain_forward_blocks = 0 if reuse_forward_blocks else n * num_steps

    embeddings = vocab_size * d * (1 if tie_word_embeddings else 2)
    positions = (max_positions + offset) * d
    forward_block = forward_prefixes + forward_construction
    total = (embeddings + positions + num_aux_layers * forward_block + gradient_module
             + n_backward_blocks * backward_block + n_plain_forward_blocks * forward_construction)

    return {
        "total": total,
        "embeddings": embeddings,
        "positions": positions,
        "forward_block": forward_block,
        "forward_block_prefixes": forward_prefixes,
        "forward_block_construction": forward_construction,
        "backward_block": backward_block,
        "gradient_module": gradient_module,
        "n_forward_blocks_with_prefixes": num_aux_layers,
        "n_forward_blocks_without_prefixes": n_plain_forward_blocks,
        "n_backward_blocks": n_backward_blocks,
        "n_prefix_tensors_per_block": n_prefix_tensors,
        "linear_forward": linear_forward,
        "linear_backward": linear_backward,
        "softmax_attention": softmax_attention,
        "gate": gate,
    }
