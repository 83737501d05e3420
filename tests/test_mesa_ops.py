"""The mesa-layer op against independent float64 references.

References written here, sharing no code with the op:
* ``primal_exact``: the recurrences for H_t and S_t token by token and ``torch.linalg.solve(H_t + Lambda, q_t)``;
* ``dual_exact``: the kernel-ridge (dual) form, a t x t solve per token from the raw keys and values, never forming H;
* ``gated_linear_attention``: the quadratic form sum_i w_ti (q_t . k_i) v_i.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tint_hf.ops import SOLVERS, chunk_mesa, fla_available, fla_chunk_mesa, naive_mesa, recurrent_mesa

DT = torch.float64


def make_inputs(batch=2, heads=2, length=37, d_k=8, d_v=6, gated=True, seed=0, dtype=DT):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, heads, length, d_k, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(batch, heads, length, d_k, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(batch, heads, length, d_v, generator=gen, dtype=dtype)
    lam = 0.25 + torch.rand(heads, d_k, generator=gen, dtype=dtype)
    if not gated:
        return q, k, v, lam, None, None
    g = F.logsigmoid(2 + torch.randn(batch, heads, length, generator=gen, dtype=dtype))
    beta = torch.rand(batch, heads, length, generator=gen, dtype=dtype)
    return q, k, v, lam, g, beta


def random_state(batch, heads, d_k, d_v, seed=1):
    gen = torch.Generator().manual_seed(seed)
    factor = torch.randn(batch, heads, d_k, d_k, generator=gen, dtype=DT) / d_k
    return factor @ factor.mT, torch.randn(batch, heads, d_k, d_v, generator=gen, dtype=DT)


def gates_or_default(q, g, beta):
    shape = q.shape[:-1]
    return (torch.zeros(shape, dtype=DT) if g is None else g), (torch.ones(shape, dtype=DT) if beta is None else beta)


def primal_exact(q, k, v, lam, g=None, beta=None, state=None):
    """O1: H_t, S_t by their recurrences; x_t = linalg.solve(H_t + diag(lam), q_t); o_t = S_t^T x_t."""
    g, beta = gates_or_default(q, g, beta)
    batch, heads, length, d_k = q.shape
    h, s = state if state is not None else (q.new_zeros(batch, heads, d_k, d_k), q.new_zeros(batch, heads, d_k, v.shape[-1]))
    outputs = []
    for t in range(length):
        gamma, b = g[:, :, t].exp()[..., None, None], beta[:, :, t][..., None, None]
        kt = k[:, :, t]
        h = gamma * h + b * torch.einsum("bhi,bhj->bhij", kt, kt)
        s = gamma * s + b * torch.einsum("bhi,bhj->bhij", kt, v[:, :, t])
        x = torch.linalg.solve(h + torch.diag_embed(lam), q[:, :, t])
        outputs.append(torch.einsum("bhkv,bhk->bhv", s, x))
    return torch.stack(outputs, dim=2), (h, s)


def dual_exact(q, k, v, lam, g=None, beta=None):
    """O2 (kernel ridge regression): o_t = V^T a_t, a_t = (I + W K Lambda^-1 K^T)^-1 W K Lambda^-1 q_t, where
    W = diag(beta_i prod_{j=i+1..t} gamma_j) over the first t tokens."""
    g, beta = gates_or_default(q, g, beta)
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=DT)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for t in range(q.shape[2]):
                keys, values = k[b, h, : t + 1], v[b, h, : t + 1]
                later = torch.cat([g[b, h, 1 : t + 1], g.new_zeros(1)]).flip(0).cumsum(0).flip(0)  # sum_{j>i} g_j
                weights = torch.diag(beta[b, h, : t + 1] * later.exp())
                scaled = keys / lam[h]  # K Lambda^-1
                system = torch.eye(t + 1, dtype=DT) + weights @ scaled @ keys.T
                a = torch.linalg.solve(system, weights @ scaled @ q[b, h, t])
                out[b, h, t] = values.T @ a
    return out


def gated_linear_attention(q, k, v, g, beta):
    """o_t = sum_{i<=t} beta_i exp(sum_{i<j<=t} g_j) (q_t . k_i) v_i."""
    cum = g.cumsum(-1)
    decay = (cum[..., :, None] - cum[..., None, :]).exp() * beta[..., None, :]
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    return ((q @ k.mT) * decay * causal) @ v


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("gated", [True, False])
def test_oracles_agree(gated):
    q, k, v, lam, g, beta = make_inputs(length=23, gated=gated)
    assert rel_err(primal_exact(q, k, v, lam, g, beta)[0], dual_exact(q, k, v, lam, g, beta)) < 1e-12


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_exact_equals_kernel_ridge_dual(gated, chunk_size):
    q, k, v, lam, g, beta = make_inputs(length=37, gated=gated)
    reference = dual_exact(q, k, v, lam, g, beta)
    o, _ = chunk_mesa(q, k, v, lam, g, beta, solver="exact", chunk_size=chunk_size)
    assert (o - reference).abs().max() < 1e-10
    o_rec, _ = recurrent_mesa(q, k, v, lam, g, beta, solver="exact")
    assert (o_rec - reference).abs().max() < 1e-10


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_chunked_equals_recurrent(solver, chunk_size):
    """Same solver, same CG step count, same x0 = 0: the chunk bookkeeping must not change anything."""
    q, k, v, lam, g, beta = make_inputs(length=37)
    state = random_state(2, 2, 8, 6)
    if solver == "gd":
        state = (None, state[1])
    o_ref, (h_ref, s_ref) = recurrent_mesa(q, k, v, lam, g, beta, state, solver=solver, cg_steps=3)
    o, (h, s) = chunk_mesa(q, k, v, lam, g, beta, state, solver=solver, cg_steps=3, chunk_size=chunk_size)
    assert (o - o_ref).abs().max() < 1e-12
    assert (s - s_ref).abs().max() < 1e-12
    if solver == "gd":
        assert h is None and h_ref is None
    else:
        assert (h - h_ref).abs().max() < 1e-12


@pytest.mark.parametrize("solver", SOLVERS)
def test_fast_forms_equal_the_naive_reference(solver):
    """tint_hf.models.mesa.mesa_naive (dense per-token solves, textbook CG) against the chunked and recurrent forms, from a
    given state; and the naive exact solve against this file's own primal oracle."""
    q, k, v, lam, g, beta = make_inputs(length=29)
    state = random_state(2, 2, 8, 6)
    o_naive, (h_naive, s_naive) = naive_mesa(q, k, v, lam, g, beta, state, solver=solver, cg_steps=3)
    if solver == "gd":
        state = (None, state[1])
    for o, (h, s) in (chunk_mesa(q, k, v, lam, g, beta, state, solver=solver, cg_steps=3, chunk_size=8),
                      recurrent_mesa(q, k, v, lam, g, beta, state, solver=solver, cg_steps=3)):
        assert (o - o_naive).abs().max() < 1e-10
        assert (s - s_naive).abs().max() < 1e-12
        assert h is None if solver == "gd" else (h - h_naive).abs().max() < 1e-12
    if solver == "exact":
        assert (o_naive - primal_exact(q, k, v, lam, g, beta, state)[0]).abs().max() < 1e-12


def test_cg_with_d_steps_is_exact():
    q, k, v, lam, g, beta = make_inputs(length=37, d_k=8)
    reference, _ = primal_exact(q, k, v, lam, g, beta)
    o, _ = chunk_mesa(q, k, v, lam, g, beta, solver="cg", cg_steps=8, chunk_size=8)
    assert rel_err(o, reference) < 1e-10


def test_cg1_is_linear_attention_with_adaptive_step():
    """cg1: x_t = alpha_t q_t with alpha_t = q^T q / q^T A_t q, so o_t = alpha_t * (gated linear attention)_t."""
    q, k, v, lam, g, beta = make_inputs(length=19)
    alphas = []
    h = q.new_zeros(2, 2, 8, 8)
    for t in range(19):
        h = g[:, :, t].exp()[..., None, None] * h + beta[:, :, t][..., None, None] * torch.einsum(
            "bhi,bhj->bhij", k[:, :, t], k[:, :, t])
        qt = q[:, :, t]
        a_q = torch.einsum("bhij,bhj->bhi", h + torch.diag_embed(lam), qt)
        alphas.append((qt * qt).sum(-1) / (qt * a_q).sum(-1))
    expected = torch.stack(alphas, dim=2)[..., None] * gated_linear_attention(q, k, v, g, beta)
    o, _ = chunk_mesa(q, k, v, lam, g, beta, solver="cg1", chunk_size=4)
    assert (o - expected).abs().max() < 1e-12


def test_gd_is_gated_linear_attention():
    q, k, v, lam, g, beta = make_inputs(length=29)
    o, _ = chunk_mesa(q, k, v, lam, g, beta, solver="gd", chunk_size=8)
    assert (o - gated_linear_attention(q, k, v, g, beta)).abs().max() < 1e-12
    h0, s0 = random_state(2, 2, 8, 6)
    _, (h, s) = chunk_mesa(q, k, v, lam, g, beta, (h0, s0), solver="gd", chunk_size=8)
    assert h is None and s.shape == s0.shape  # gd keeps S only


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_state_passing(solver):
    """[0, T) in one call equals [0, T1) then [T1, T) with the final state handed over."""
    q, k, v, lam, g, beta = make_inputs(length=37)
    o, (h, s) = chunk_mesa(q, k, v, lam, g, beta, solver=solver, cg_steps=8, chunk_size=8)
    parts = [(0, 13), (13, 37)]
    state, outs = None, []
    for lo, hi in parts:
        o_part, state = chunk_mesa(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], lam, g[:, :, lo:hi],
                                   beta[:, :, lo:hi], state, solver=solver, cg_steps=8, chunk_size=8)
        outs.append(o_part)
    assert (torch.cat(outs, dim=2) - o).abs().max() < 1e-12
    assert (state[0] - h).abs().max() < 1e-12 and (state[1] - s).abs().max() < 1e-12


def test_chunk_states_without_a_loop_keep_float32_precision():
    """The closed-form inter-chunk states equal the sequential recurrence X <- e^G X + dX: to rounding in float64, and
    in float32 over 300 strongly decaying chunks (running log-decay down to about -900) to 1e-6 relative, which
    differences of running totals of G would miss by 25x."""
    from tint_hf.models.mesa.mesa_op import states_before_chunks

    gen = torch.Generator().manual_seed(0)
    log_decay = -6 * torch.rand(2, 1, 300, generator=gen, dtype=DT)
    deltas = torch.randn(2, 1, 300, 3, 2, generator=gen, dtype=DT)
    initial = torch.randn(2, 1, 3, 2, generator=gen, dtype=DT)
    state, reference = initial, [initial]
    for n in range(300):
        state = log_decay[:, :, n, None, None].exp() * state + deltas[:, :, n]
        reference.append(state)
    reference = torch.stack(reference, dim=2)
    torch.testing.assert_close(states_before_chunks(deltas, log_decay, initial), reference, rtol=1e-12, atol=1e-12)
    single = states_before_chunks(deltas.float(), log_decay.float(), initial.float()).double()
    assert (single - reference).abs().max() < 1e-6 * reference.abs().max()


def test_masked_tokens_leave_state_unchanged():
    """Tokens with beta = 0 and g = 0 (padding) change neither the state nor the other tokens' outputs."""
    q, k, v, lam, g, beta = make_inputs(length=20)
    keep = torch.ones(20, dtype=torch.bool)
    keep[[0, 1, 2, 9, 15]] = False
    g_pad, beta_pad = g * keep, beta * keep
    o, (h, s) = chunk_mesa(q, k, v, lam, g_pad, beta_pad, solver="exact", chunk_size=4)
    o_kept, (h_kept, s_kept) = chunk_mesa(q[:, :, keep], k[:, :, keep], v[:, :, keep], lam, g[:, :, keep],
                                          beta[:, :, keep], solver="exact", chunk_size=4)
    assert (o[:, :, keep] - o_kept).abs().max() < 1e-12
    assert (h - h_kept).abs().max() < 1e-12 and (s - s_kept).abs().max() < 1e-12


@pytest.mark.parametrize("solver", SOLVERS)
def test_gradcheck_chunked(solver):
    """torch.autograd.gradcheck of the chunked form (implicit backward for exact/cg) w.r.t. every input."""
    q, k, v, lam, g, beta = make_inputs(batch=1, heads=2, length=7, d_k=4, d_v=3)
    h0, s0 = random_state(1, 2, 4, 3)
    factor = torch.linalg.cholesky(h0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, lam, g, beta, factor, s0)]

    def fn(q, k, v, lam, g, beta, factor, s0):
        state = (factor @ factor.mT, s0)  # H_0 stays symmetric under the finite-difference perturbations
        o, (h, s) = chunk_mesa(q, k, v, lam, g, beta, state, solver=solver, cg_steps=4, chunk_size=3)
        return (o, s) if h is None else (o, h, s)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("solver", SOLVERS)
def test_chunked_form_compiles_as_one_graph(solver):
    """torch.compile(fullgraph=True) traces forward and implicit backward without a graph break, same numbers."""
    q, k, v, lam, g, beta = make_inputs(batch=1, heads=2, length=19, d_k=6, d_v=5)
    state = random_state(1, 2, 6, 5)

    def loss(*inputs):
        o, (_, s) = chunk_mesa(*inputs, solver=solver, cg_steps=6, chunk_size=8)
        return (o * o.detach().cos()).sum() + s.sum()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, lam, g, beta)]
        value = fn(*leaves, state)
        value.backward()
        results.append([value.detach(), *(leaf.grad for leaf in leaves)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


def test_implicit_gradients_match_autograd_through_linalg_solve():
    q, k, v, lam, g, beta = make_inputs(batch=2, heads=2, length=21, d_k=6, d_v=5)
    state = random_state(2, 2, 6, 5)
    probe = torch.randn(2, 2, 21, 5, dtype=DT, generator=torch.Generator().manual_seed(3))
    grads = []
    for op in ("chunk_exact", "chunk_cg", "oracle"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, lam, g, beta, *state)]
        *inputs, h0, s0 = leaves
        if op == "oracle":
            o, _ = primal_exact(*inputs, state=(h0, s0))
        else:
            o, _ = chunk_mesa(*inputs, (h0, s0), solver=op.split("_")[1], cg_steps=6, chunk_size=4)
        (o * probe).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for exact, cg, reference in zip(*grads):
        assert (exact - reference).abs().max() < 1e-8 * max(1.0, reference.abs().max().item())
        assert (cg - reference).abs().max() < 1e-8 * max(1.0, reference.abs().max().item())


def test_float32_cg_accuracy_at_head_dim_64():
    """fp32 chunked CG with 30 steps (no additive epsilon) against the float64 exact oracle: d = 64, T = 256."""
    q, k, v, lam, g, beta = make_inputs(batch=1, heads=2, length=256, d_k=64, d_v=64, seed=5)
    reference, _ = primal_exact(q, k, v, lam, g, beta)
    o, (h, s) = chunk_mesa(*(t.float() for t in (q, k, v, lam, g, beta)), solver="cg", cg_steps=30)
    assert o.dtype == torch.float32 and h.dtype == s.dtype == torch.float32
    assert rel_err(o.double(), reference) < 1e-5


def test_low_precision_inputs_keep_float32_state():
    q, k, v, lam, g, beta = make_inputs(length=10)
    o, (h, s) = chunk_mesa(*(t.bfloat16() for t in (q, k, v)), lam, g, beta, solver="cg", cg_steps=8)
    assert o.dtype == torch.bfloat16 and h.dtype == s.dtype == torch.float32
    reference, _ = chunk_mesa(q, k, v, lam, g, beta, solver="exact")
    assert rel_err(o.double(), reference) < 3e-2  # bf16 rounding of the inputs only


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and flash-linear-attention")
def test_fla_backend_matches_torch():
    q, k, v, lam, g, beta = (t.float().cuda() for t in make_inputs(length=200, d_k=64, d_v=64))
    state = tuple(t.float().cuda() for t in random_state(2, 2, 64, 64))
    o_fla, (h_fla, s_fla) = fla_chunk_mesa(q, k, v, lam, g, beta, state, cg_steps=30)
    o, (h, s) = chunk_mesa(q, k, v, lam, g, beta, state, solver="cg", cg_steps=30)
    assert rel_err(o_fla.float(), o) < 5e-3
    assert rel_err(s_fla, s) < 5e-3 and rel_err(h_fla, h) < 5e-3


def packed_resets(batch, length, starts):
    resets = torch.zeros(batch, length, dtype=torch.bool)
    for row, row_starts in enumerate(starts):
        resets[row, row_starts] = True
    return resets


PACKED_STARTS = [[0, 5, 6, 17], [0, 8, 12]]  # documents of 5, 1, 11, 20 and 8, 4, 25 tokens (T = 37)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("chunk_size", [4, 6, 64])
def test_packed_documents_equal_running_them_one_by_one(solver, chunk_size):
    """Resets restart the state: each packed document's outputs equal those of the document alone (the naive
    reference for cg / cg1 / gd, the independent exact solve for exact), for the chunked and recurrent forms,
    with documents that start at, inside and across chunk boundaries; the initial state only reaches a first
    document that is not reset."""
    q, k, v, lam, g, beta = make_inputs()
    resets = packed_resets(2, 37, PACKED_STARTS)
    state = random_state(2, 2, 8, 6)
    chunked, _ = chunk_mesa(q, k, v, lam, g, beta, state, solver=solver, cg_steps=5, chunk_size=chunk_size,
                            resets=resets)
    recurrent, _ = recurrent_mesa(q, k, v, lam, g, beta, state, solver=solver, cg_steps=5, resets=resets)
    for row, starts in enumerate(PACKED_STARTS):
        for start, end in zip(starts, starts[1:] + [37], strict=True):
            piece = [t[row : row + 1, :, start:end] for t in (q, k, v)]
            gates = [t[row : row + 1, :, start:end] for t in (g, beta)]
            if solver == "exact":
                alone, _ = primal_exact(*piece, lam, *gates)
            else:
                alone, _ = naive_mesa(*piece, lam, *gates, solver=solver, cg_steps=5)
            torch.testing.assert_close(chunked[row, :, start:end], alone[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(recurrent[row, :, start:end], alone[0], rtol=1e-10, atol=1e-12)
    # without a reset at t = 0 the initial state reaches the first document
    no_first = resets.clone()
    no_first[:, 0] = False
    carried, _ = chunk_mesa(q, k, v, lam, g, beta, state, solver=solver, cg_steps=5, chunk_size=chunk_size,
                            resets=no_first)
    assert not torch.allclose(carried[:, :, :5], chunked[:, :, :5])
    torch.testing.assert_close(carried[:, :, 8:], chunked[:, :, 8:])


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_gradcheck_chunked_with_resets(solver):
    q, k, v, lam, g, beta = make_inputs(batch=1, heads=1, length=9, d_k=3, d_v=2)
    resets = packed_resets(1, 9, [[0, 2, 7]])
    leaves = [t.clone().requires_grad_() for t in (q, k, v, lam, g, beta)]

    def fn(q, k, v, lam, g, beta):
        return chunk_mesa(q, k, v, lam, g, beta, solver=solver, cg_steps=3, chunk_size=4, resets=resets)[0]

    assert torch.autograd.gradcheck(fn, leaves)
