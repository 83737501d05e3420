"""The mesa-layer written as plainly as possible: one token at a time, every state and solve spelled out.

A readable reference for :mod:`.mesa_op` (its fast forms must agree with it), not for speed. Per head, with
gamma_t = exp(g_t):

    H_t = gamma_t H_{t-1} + beta_t k_t k_t^T,    S_t = gamma_t S_{t-1} + beta_t k_t v_t^T,
    x_t = (H_t + diag(lam))^{-1} q_t             ("exact": a dense solve; "cg": ``cg_steps`` textbook conjugate-
                                                  gradient steps from 0; "cg1": one step; "gd": x_t = q_t)
    o_t = S_t^T x_t
"""

from __future__ import annotations

import torch


def _conjugate_gradient(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` CG iterations for a x = b from x = 0: a (..., d, d) SPD, b (..., d). Stops updating a system once
    its residual is exactly zero (so that no 0 / 0 occurs)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(-1, keepdim=True)
    for _ in range(steps):
        ap = (a @ p.unsqueeze(-1)).squeeze(-1)
        pap = (p * ap).sum(-1, keepdim=True)
        alpha = torch.where(pap > 0, rr / torch.where(pap > 0, pap, 1), 0)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = (r * r).sum(-1, keepdim=True)
        p = r + torch.where(rr > 0, rr_new / torch.where(rr > 0, rr, 1), 0) * p
        rr = rr_new
    return x


def naive_mesa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, g: torch.Tensor | None = None,
               beta: torch.Tensor | None = None, initial_state: tuple[torch.Tensor | None, torch.Tensor] | None = None,
               solver: str = "exact", cg_steps: int = 30, resets: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Outputs (B, heads, T, d_v) and the final state (H, S) of the mesa-layer, token by token, in the input dtype.

    q, k (B, heads, T, d_k); v (B, heads, T, d_v); lam (heads, d_k); g (log forget gate) and beta (input gate)
    (B, heads, T), default 0 and 1; ``initial_state`` (H, S) or None (zeros; H may be None for ``"gd"``);
    ``resets`` (B, T) bool: True at the first token of a packed document, where H and S are emptied.
    """
    batch, heads, length, d_k = q.shape
    g = q.new_zeros(batch, heads, length) if g is None else g
    beta = q.new_ones(batch, heads, length) if beta is None else beta
    h = q.new_zeros(batch, heads, d_k, d_k)
    s = q.new_zeros(batch, heads, d_k, v.shape[-1])
    if initial_state is not None:
        h = h if initial_state[0] is None else initial_state[0].to(q.dtype)
        s = initial_state[1].to(q.dtype)
    ridge = torch.diag_embed(lam.to(q.dtype))  # (heads, d_k, d_k)
    outputs = []
    for t in range(length):
        if resets is not None:
            restart = resets[:, t].to(torch.bool)[:, None, None, None]
            h, s = h.masked_fill(restart, 0.0), s.masked_fill(restart, 0.0)
        gamma, b = g[:, :, t].exp()[..., None, None], beta[:, :, t][..., None, None]
        k_t, q_t = k[:, :, t], q[:, :, t]
        h = gamma * h + b * k_t.unsqueeze(-1) * k_t.unsqueeze(-2)
        s = gamma * s + b * k_t.unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        if solver == "gd":
            x = q_t
        elif solver == "exact":
            x = torch.linalg.solve(h + ridge, q_t)
        elif solver in ("cg", "cg1"):
            x = _conjugate_gradient(h + ridge, q_t, 1 if solver == "cg1" else cg_steps)
        else:
            raise ValueError(f"solver={solver!r}: use 'exact', 'cg', 'cg1' or 'gd'.")
        outputs.append((s.transpose(-1, -2) @ x.unsqueeze(-1)).squeeze(-1))
    return torch.stack(outputs, dim=2), (h, s)


__all__ = ["naive_mesa"]
