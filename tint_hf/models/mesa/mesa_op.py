"""The mesa-layer: causal attention whose query is preconditioned by a per-token ridge-regression solve.

Per head, with keys k_t and queries q_t of width d_k, values v_t of width d_v, log forget gate g_t <= 0
(gamma_t = exp(g_t)), input gate beta_t and ridge diagonal Lambda = diag(lam) > 0:

    H_t = gamma_t H_{t-1} + beta_t k_t k_t^T          (d_k x d_k, symmetric PSD)
    S_t = gamma_t S_{t-1} + beta_t k_t v_t^T          (d_k x d_v)
    x_t = (H_t + Lambda)^{-1} q_t                     (the "preconditioned query")
    o_t = S_t^T x_t

``o_t`` is the prediction at ``q_t`` of the ridge regression of the values on the keys seen so far (von Oswald et
al. 2023; with gates, MesaNet, von Oswald et al. 2025). With ``g = 0`` and ``beta = 1`` it is the 2023 mesa-layer.
Solvers for x_t:

* ``"exact"``: Cholesky factorisation of H_t + Lambda per token (the reference);
* ``"cg"``: ``cg_steps`` conjugate-gradient steps from x = 0 (MesaNet);
* ``"cg1"``: one CG step, x_t = (q^T q / q^T A_t q) q_t (linear attention with a data-adaptive step);
* ``"gd"``: x_t = q_t, i.e. (gated) causal linear attention, one gradient-descent step; H is not kept.

Three forms compute the same outputs (to rounding): :func:`mesa_step` (one token, for decoding),
:func:`recurrent_mesa` (token by token, O(T) sequential steps) and :func:`chunk_mesa`, the chunkwise-parallel
training form. The chunked form splits the sequence into chunks of C tokens; inside chunk n, with the state
(H_[n], S_[n]) before the chunk, the within-chunk cumulative log gate b_j = sum_{i<=j} g_i and the decay mask
M_ji = exp(b_j - b_i) beta_i [i <= j], the C tokens' systems are applied as one batched matrix product

    A(P) = diag(e^b) P H_[n] + ((P K^T) * M) K + P Lambda          (rows of P, K: tokens)

and the readout is O = diag(e^b) X S_[n] + ((X K^T) * M) V. For ``"exact"`` and ``"cg"`` the solve is a custom
autograd function differentiated implicitly: from A x = q, dq = A^{-1} dx (a second solve with the same operator)
and the gradients of everything that defines A are those of the surrogate -<dq, A(theta) x> with dq and x held
fixed, written out in closed form (:func:`_chunk_matvec_vjp`, so the op has no graph break under torch.compile).
The backward therefore stores x (T x d_k) and the chunk states, never the CG iterates.

Packed sequences: ``resets`` (B, T) marks the first token of each document; the state is emptied before it
(gamma_t = 0 there, exactly: the chunked form zeroes the decay across a reset instead of adding a large negative
log gate), so documents packed in one row give the outputs of running them one by one.

States are float32 (float64 for float64 inputs) whatever the input dtype; outputs have the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

try:  # optional GPU kernels (flash-linear-attention); never required
    from fla.ops.mesa_net import chunk_mesa_net as _fla_chunk_mesa_net
except ImportError:
    _fla_chunk_mesa_net = None

SOLVERS = ("exact", "cg", "cg1", "gd")
MesaState = tuple[torch.Tensor | None, torch.Tensor]
"""(H, S): H of shape (B, heads, d_k, d_k), or None for the ``"gd"`` solver; S of shape (B, heads, d_k, d_v)."""


def fla_available() -> bool:
    """Whether flash-linear-attention's MesaNet kernel can be imported."""
    return _fla_chunk_mesa_net is not None


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and solves use: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` conjugate-gradient iterations on A x = rhs from x = 0, batched over all leading dimensions.

    ``rhs`` is (..., d) and ``matvec(p)`` returns A p for a symmetric positive definite A, row-wise. The scalars are
    guarded by the smallest normal number instead of an additive epsilon, so a converged system stays converged.
    """
    tiny = torch.finfo(rhs.dtype).tiny
    x = torch.zeros_like(rhs)
    residual = rhs
    direction = rhs
    delta = torch.linalg.vecdot(residual, residual)[..., None]
    for _ in range(steps):
        a_direction = matvec(direction)
        alpha = delta / torch.linalg.vecdot(direction, a_direction)[..., None].clamp_min(tiny)
        x = torch.addcmul(x, alpha, direction)  # fused x + alpha * direction
        residual = torch.addcmul(residual, alpha, a_direction, value=-1)
        new_delta = torch.linalg.vecdot(residual, residual)[..., None]
        direction = torch.addcmul(residual, new_delta / delta.clamp_min(tiny), direction)
        delta = new_delta
    return x


def _default_gates(q: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor | None, dtype: torch.dtype):
    """g = 0 (no forgetting) and beta = 1 when not given; both of shape (B, heads, T) in ``dtype``."""
    shape = q.shape[:-1]
    g = torch.zeros(shape, dtype=dtype, device=q.device) if g is None else g.to(dtype)
    beta = torch.ones(shape, dtype=dtype, device=q.device) if beta is None else beta.to(dtype)
    return g, beta


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"Unknown mesa solver {solver!r}; expected one of {SOLVERS}.")


# ----------------------------------------------------------------------------------------------------------------
# Recurrent form
# ----------------------------------------------------------------------------------------------------------------
def mesa_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    state: MesaState | None = None,
    solver: str = "cg",
    cg_steps: int = 30,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MesaState]:
    """One token of the mesa-layer: update (H, S), solve (H + Lambda) x = q, return o = S^T x and the new state.

    Args:
        q, k: (B, heads, d_k); v: (B, heads, d_v); lam: (heads, d_k) ridge diagonal (> 0);
        g: (B, heads) log forget gate (default 0); beta: (B, heads) input gate (default 1);
        state: (H, S) before this token (zeros when None); reset: (B,) bool, True where this token starts a new
        document (the state before it is dropped).

    Returns:
        o: (B, heads, d_v) in q's dtype, and the state after this token.
    """
    _check_solver(solver)
    dtype = state_dtype(q.dtype)
    batch, heads, d_k = q.shape
    g, beta = _default_gates(q, g, beta, dtype)
    q, k, v, lam = q.to(dtype), k.to(dtype), v.to(dtype), lam.to(dtype)
    if state is None:
        h_prev = None if solver == "gd" else q.new_zeros(batch, heads, d_k, d_k)
        s_prev = q.new_zeros(batch, heads, d_k, v.shape[-1])
    else:
        h_prev, s_prev = state
    gamma = g.exp()
    if reset is not None:
        gamma = gamma.masked_fill(reset.to(torch.bool)[:, None], 0.0)
    gamma = gamma[..., None, None]
    beta = beta[..., None, None]
    s_new = gamma * s_prev + beta * k[..., :, None] * v[..., None, :]
    if solver == "gd":
        x, h_new = q, None
    else:
        h_new = gamma * h_prev + beta * k[..., :, None] * k[..., None, :]
        system = h_new + torch.diag_embed(lam)
        if solver == "exact":
            x = torch.cholesky_solve(q[..., None], torch.linalg.cholesky(system)).squeeze(-1)
        else:
            steps = 1 if solver == "cg1" else cg_steps
            x = conjugate_gradient(lambda p: (system @ p[..., None]).squeeze(-1), q, steps)
    o = torch.einsum("bhkv,bhk->bhv", s_new, x)
    return o, (h_new, s_new)


def recurrent_mesa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    initial_state: MesaState | None = None,
    solver: str = "cg",
    cg_steps: int = 30,
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MesaState]:
    """The mesa-layer token by token (:func:`mesa_step` for t = 1..T).

    Shapes: q, k (B, heads, T, d_k); v (B, heads, T, d_v); g, beta (B, heads, T); lam (heads, d_k); resets (B, T).
    Returns o (B, heads, T, d_v) and the final state (H_T, S_T).
    """
    state = initial_state
    outputs = []
    for t in range(q.shape[2]):
        o, state = mesa_step(
            q[:, :, t], k[:, :, t], v[:, :, t], lam,
            None if g is None else g[:, :, t], None if beta is None else beta[:, :, t],
            state, solver, cg_steps, None if resets is None else resets[:, t],
        )
        outputs.append(o)
    if not outputs:
        raise ValueError("recurrent_mesa needs at least one token.")
    return torch.stack(outputs, dim=2).to(q.dtype), state


# ----------------------------------------------------------------------------------------------------------------
# Chunkwise-parallel form
# ----------------------------------------------------------------------------------------------------------------
def _chunk_matvec(
    p: torch.Tensor, k: torch.Tensor, decay: torch.Tensor, mask: torch.Tensor, h_chunks: torch.Tensor,
    lam: torch.Tensor,
) -> torch.Tensor:
    """A_t p_t for every token t at once: (B, heads, N, C, d_k) -> same shape.

    ``decay`` (B, heads, N, C) is e^{b_t}, ``mask`` (B, heads, N, C, C) the decay mask M, ``h_chunks``
    (B, heads, N, d_k, d_k) the H state before each chunk and ``lam`` (heads, d_k).
    """
    rows, keys = p.flatten(0, 2), k.flatten(0, 2)  # (B * heads * N, C, d_k)
    state_term = (rows @ h_chunks.flatten(0, 2).mT).view_as(p)  # H_[n] p_t
    state_part = torch.addcmul(p * lam[None, :, None, None, :], decay[..., None], state_term)
    scores = (rows @ keys.mT) * mask.flatten(0, 2)  # (B * heads * N, C, C)
    return state_part.flatten(0, 2).baddbmm_(scores, keys).view_as(p)  # in place into a fresh temporary


def _chunk_solve(
    rhs: torch.Tensor, k: torch.Tensor, decay: torch.Tensor, mask: torch.Tensor, h_chunks: torch.Tensor,
    lam: torch.Tensor, solver: str, cg_steps: int,
) -> torch.Tensor:
    """A_t^{-1} rhs_t for every token: CG with the batched matvec, or Cholesky of A_t built one chunk at a time."""
    if solver == "cg":
        return conjugate_gradient(lambda p: _chunk_matvec(p, k, decay, mask, h_chunks, lam), rhs, cg_steps)
    ridge = torch.diag_embed(lam)[None, :, None]  # (1, heads, 1, d_k, d_k)
    solutions = []
    for n in range(rhs.shape[2]):
        # A_t = e^{b_t} H_[n] + sum_i M_ti k_i k_i^T + Lambda for the C tokens of chunk n: (B, heads, C, d_k, d_k)
        systems = (
            decay[:, :, n, :, None, None] * h_chunks[:, :, n, None]
            + torch.einsum("bhti,bhid,bhie->bhtde", mask[:, :, n], k[:, :, n], k[:, :, n])
            + ridge
        )
        chol = torch.linalg.cholesky(systems)
        solutions.append(torch.cholesky_solve(rhs[:, :, n, ..., None], chol).squeeze(-1))
    return torch.stack(solutions, dim=2)


class _ImplicitSolve(torch.autograd.Function):
    """x = A(theta)^{-1} q for all tokens, differentiated implicitly (no graph through the solver's iterations)."""

    @staticmethod
    def forward(ctx, q, k, decay, mask, h_chunks, lam, solver: str, cg_steps: int):
        x = _chunk_solve(q, k, decay, mask, h_chunks, lam, solver, cg_steps)
        ctx.save_for_backward(k, decay, mask, h_chunks, lam, x)
        ctx.solver, ctx.cg_steps = solver, cg_steps
        return x

    @staticmethod
    def backward(ctx, dx):
        k, decay, mask, h_chunks, lam, x = ctx.saved_tensors
        # A is symmetric, so dq = A^{-T} dx = A^{-1} dx; and d(theta) = -<dq, dA/dtheta x>.
        dq = _chunk_solve(dx, k, decay, mask, h_chunks, lam, ctx.solver, ctx.cg_steps)
        grads = _chunk_matvec_vjp(x, dq.neg(), k, decay, mask, h_chunks)
        return dq, *grads, None, None


def _chunk_matvec_vjp(
    x: torch.Tensor, w: torch.Tensor, k: torch.Tensor, decay: torch.Tensor, mask: torch.Tensor, h_chunks: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Gradients of sum_t <w_t, A_t x_t> with respect to k, decay, mask, H_[n] and lam, holding w and x fixed.

    With (XK^T)_ti = x_t . k_i and (WK^T)_ti = w_t . k_i inside each chunk (shapes as in :func:`_chunk_matvec`):
    d k = (M * XK^T)^T W + (M * WK^T)^T X, d e^{b_t} = w_t . H_[n] x_t, d M = WK^T * XK^T,
    d H_[n] = sum_t e^{b_t} w_t x_t^T and d lam = sum over batch and tokens of w * x.
    """
    xk = x @ k.mT  # (B, heads, N, C, C)
    wk = w @ k.mT
    d_k = (mask * xk).mT @ w + (mask * wk).mT @ x
    d_decay = torch.linalg.vecdot(w, x @ h_chunks.mT)
    d_h = (decay[..., None] * w).mT @ x
    d_lam = (w * x).sum((0, 2, 3))
    return d_k, d_decay, wk * xk, d_h, d_lam


def states_before_chunks(
    deltas: torch.Tensor, log_chunk_decay: torch.Tensor, initial: torch.Tensor
) -> torch.Tensor:
    """All chunk states of the recurrence X_[n+1] = e^{G_n} X_[n] + dX_n at once, without a loop over chunks.

    ``deltas`` (B, heads, N, d, e) holds dX_n, ``log_chunk_decay`` (B, heads, N) the chunk's total log gate G_n and
    ``initial`` (B, heads, d, e) X_[0]. Returns X_[0..N] as (B, heads, N + 1, d, e):

        X_[n] = e^{G_0 + ... + G_{n-1}} X_[0] + sum_{m<n} e^{G_{m+1} + ... + G_{n-1}} dX_m.

    The exponents are segment sums of the G's (a masked cumulative sum), not differences of running totals, so
    they keep full relative precision however long the sequence.
    """
    n_chunks = deltas.shape[2]
    later = torch.ones(n_chunks, n_chunks, dtype=torch.bool, device=deltas.device).tril(-1)  # [j, m]: j > m
    # segment[n, m] = G_{m+1} + ... + G_{n-1}, from the cumulative sum over j of G_j [j > m]; row n = 0 is padding.
    later_gates = log_chunk_decay[..., :, None].expand(*log_chunk_decay.shape, n_chunks).masked_fill(~later, 0.0)
    segment = F.pad(later_gates.cumsum(-2), (0, 0, 1, 0))  # (B, heads, N + 1, N)
    earlier = torch.ones(n_chunks + 1, n_chunks, dtype=torch.bool, device=deltas.device).tril(-1)  # [n, m]: m < n
    weights = segment.masked_fill(~earlier, float("-inf")).exp()
    carried = (weights @ deltas.flatten(-2)).unflatten(-1, deltas.shape[-2:])
    initial_decay = F.pad(log_chunk_decay.cumsum(-1), (1, 0)).exp()  # (B, heads, N + 1)
    return carried + initial_decay[..., None, None] * initial[:, :, None]


def chunk_mesa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    initial_state: MesaState | None = None,
    solver: str = "cg",
    cg_steps: int = 30,
    chunk_size: int = 64,
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MesaState]:
    """The mesa-layer over a whole sequence in the chunkwise-parallel form (training, prefill).

    Args:
        q, k: (B, heads, T, d_k); v: (B, heads, T, d_v); lam: (heads, d_k), > 0;
        g: (B, heads, T) log forget gate <= 0 (default 0); beta: (B, heads, T) input gate (default 1);
        initial_state: (H_0, S_0) or None for zeros; solver: one of :data:`SOLVERS`;
        cg_steps: CG iterations for ``"cg"``; chunk_size: C, any positive size (T is padded to a multiple);
        resets: (B, T) bool, True at the first token of each packed document (the state restarts there).

    Returns:
        o: (B, heads, T, d_v) in q's dtype, and the final state (H_T, S_T) in float32 (float64 for float64 inputs).
    """
    _check_solver(solver)
    in_dtype = q.dtype
    dtype = state_dtype(in_dtype)
    batch, heads, length, d_k = q.shape
    d_v = v.shape[-1]
    with torch.autocast(q.device.type, enabled=False):
        g, beta = _default_gates(q, g, beta, dtype)
        q, k, v, lam = q.to(dtype), k.to(dtype), v.to(dtype), lam.to(dtype)
        # Pad T to a multiple of C with beta = 0, g = 0: padded tokens leave the state unchanged.
        pad = (-length) % chunk_size
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
        n_chunks = (length + pad) // chunk_size
        q, k, v = (x.reshape(batch, heads, n_chunks, chunk_size, x.shape[-1]) for x in (q, k, v))
        g, beta = (x.reshape(batch, heads, n_chunks, chunk_size) for x in (g, beta))

        b = g.cumsum(-1)  # within-chunk cumulative log decay b_j
        decay = b.exp()  # e^{b_j}: decay from the chunk start to token j
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
        mask = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp() * beta[..., None, :]
        k_to_end = k * ((b[..., -1:] - b).exp() * beta)[..., None]  # e^{b_C - b_j} beta_j k_j
        chunk_log_decay = b[..., -1]  # G_n, (B, heads, N)
        if resets is not None:
            # r_j: resets in the chunk up to token j. Token i reaches token j only if r_i == r_j, the chunk start
            # only if r_j == 0, the chunk end only if r_j == r_C; a chunk with a reset carries nothing through.
            r = F.pad(resets.to(torch.int32), (0, pad)).reshape(batch, 1, n_chunks, chunk_size).cumsum(-1)
            mask = mask * (r[..., :, None] == r[..., None, :])
            decay = decay * (r == 0)
            k_to_end = k_to_end * (r == r[..., -1:])[..., None]
            chunk_log_decay = chunk_log_decay.masked_fill(r[..., -1] > 0, float("-inf"))

        # Chunk states (H_[n] | S_[n]) before every chunk n = 0..N side by side, (B, heads, N + 1, d_k, d_k + d_v);
        # H is left out for "gd".
        keep_h = solver != "gd"
        h_state, s_state = initial_state if initial_state is not None else (None, None)
        s_state = q.new_zeros(batch, heads, d_k, d_v) if s_state is None else s_state.to(dtype)
        targets, initial = v, s_state
        if not keep_h:
            h_state = None  # "gd" keeps no H: its state is (None, S) whatever it was given
        else:
            h_state = q.new_zeros(batch, heads, d_k, d_k) if h_state is None else h_state.to(dtype)
            targets, initial = torch.cat([k, v], dim=-1), torch.cat([h_state, s_state], dim=-1)
        states = states_before_chunks(k_to_end.mT @ targets, chunk_log_decay, initial)
        s_chunks, s_state = states[:, :, :-1, :, -d_v:].contiguous(), states[:, :, -1, :, -d_v:]
        if keep_h:
            h_chunks, h_state = states[:, :, :-1, :, :d_k].contiguous(), states[:, :, -1, :, :d_k]

        # Preconditioned queries x_t = A_t^{-1} q_t, (B, heads, N, C, d_k).
        if solver == "gd":
            x = q
        else:
            if solver == "cg1":
                x = conjugate_gradient(lambda p: _chunk_matvec(p, k, decay, mask, h_chunks, lam), q, 1)
            else:
                x = _ImplicitSolve.apply(q, k, decay, mask, h_chunks, lam, solver, cg_steps)

        # Readout o_t = S_t^T x_t, split into the chunk state and the within-chunk part.
        o = decay[..., None] * (x @ s_chunks) + ((x @ k.transpose(-1, -2)) * mask) @ v
        o = o.reshape(batch, heads, n_chunks * chunk_size, d_v)[:, :, :length]
    return o.to(in_dtype), (h_state, s_state)


def fla_chunk_mesa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: MesaState | None = None,
    cg_steps: int = 30,
) -> tuple[torch.Tensor, MesaState]:
    """:func:`chunk_mesa` with solver ``"cg"`` on flash-linear-attention's Triton kernels (CUDA, fla installed).

    Same shapes and conventions as :func:`chunk_mesa` (q and k already L2-normalised). fla works in the
    (B, T, heads, d) layout, in bfloat16 for q/k/v and with fixed chunks of 64; it needs d_v == d_k <= 128 and agrees
    with the torch path to about 1e-3 (it adds 1e-5 to the CG denominators).
    """
    if _fla_chunk_mesa_net is None:
        raise ImportError("mesa_backend='fla' needs the `flash-linear-attention` package (and a CUDA device).")
    h0, s0 = initial_state if initial_state is not None else (None, None)
    kernel_dtype = torch.bfloat16 if q.dtype == torch.float32 else q.dtype
    o, h_final, s_final = _fla_chunk_mesa_net(
        q=q.transpose(1, 2).to(kernel_dtype),
        k=k.transpose(1, 2).to(kernel_dtype),
        v=v.transpose(1, 2).to(kernel_dtype),
        g=g.transpose(1, 2).float(),
        beta=beta.transpose(1, 2).float(),
        lamb=lam.float(),
        h_kk_init=None if h0 is None else h0.float().contiguous(),
        h_kv_init=None if s0 is None else s0.float().contiguous(),
        output_final_state=True,
        max_CG_iteration=cg_steps,
    )
    return o.transpose(1, 2).to(q.dtype), (h_final, s_final)
