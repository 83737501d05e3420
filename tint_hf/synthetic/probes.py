r"""Probes of what a model trained on a synthetic task computes.

* In-context baselines over prefixes: for pairs ``(x_i, y_i)`` and queries ``q_t`` of one sequence, the prediction
  at t uses the pairs ``i < t`` only: least squares / ridge (:func:`prefix_ridge`) and K gradient steps from ``W = 0``
  on ``L_t(W) = 1/(2 m_t) sum_{i<t} |W x_i - y_i|^2`` with ``m_t = max(t, 1)`` (:func:`prefix_gd`).
* :func:`compare_with_gd`: the learning rate that brings K steps of GD closest to a model's predictions, and how close
  that is (von Oswald et al. 2023 report a trained linear self-attention layer as identical to one step).
* :func:`weights_component_score`: a ridge probe of the context-free target on the representation computed with the
  attention replaced by the identity (Fu et al. 2024).
* :func:`plateau_length`: steps until a loss curve is halfway between its plateau and its final value.

Everything is computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .models import SequenceModel, self_only_mixing


def _prefix_statistics(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, n, dx), y (B, n, dy) -> Gram G_t = sum_{i<t} x_i x_i^T (B, n, dx, dx), cross C_t = sum_{i<t} y_i x_i^T
    (B, n, dy, dx) and counts m_t = max(t, 1) (n,)."""
    x, y = x.double(), y.double()
    gram = torch.cumsum(x[..., :, None] * x[..., None, :], dim=1) - x[..., :, None] * x[..., None, :]
    cross = torch.cumsum(y[..., :, None] * x[..., None, :], dim=1) - y[..., :, None] * x[..., None, :]
    counts = torch.arange(x.shape[1], dtype=torch.float64, device=x.device).clamp(min=1)
    return gram, cross, counts


def prefix_ridge(x: torch.Tensor, y: torch.Tensor, queries: torch.Tensor, lam: float = 0.0) -> torch.Tensor:
    """(B, n, dy): the prediction ``W_t q_t`` of ridge regression ``W_t = C_t (G_t + lam I)^{-1}`` on the pairs before
    t; ``lam = 0`` gives the minimum-norm least-squares solution (pseudo-inverse)."""
    gram, cross, _ = _prefix_statistics(x, y)
    queries = queries.double()[..., None]  # (B, n, dx, 1)
    if lam == 0:
        solved = torch.linalg.pinv(gram, hermitian=True) @ queries
    else:
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        solved = torch.linalg.solve(gram + lam * eye, queries)
    return (cross @ solved)[..., 0]


def _gd_weights(gram: torch.Tensor, cross: torch.Tensor, counts: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """K = ``steps`` gradient steps from W = 0 given the statistics (..., dx, dx), (..., dy, dx) and counts (...)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    scale = (lr / counts)[..., None, None]
    weights = scale * cross
    for _ in range(steps - 1):
        weights = weights - scale * (weights @ gram - cross)
    return weights


def prefix_gd_weights(x: torch.Tensor, y: torch.Tensor, lr: float, steps: int = 1) -> torch.Tensor:
    """(B, n, dy, dx): ``W_K`` after K = ``steps`` gradient steps ``W <- W - lr (W G_t - C_t) / m_t`` from W = 0."""
    gram, cross, counts = _prefix_statistics(x, y)
    return _gd_weights(gram, cross, counts.expand(gram.shape[:2]), lr, steps)


def prefix_gd(x: torch.Tensor, y: torch.Tensor, queries: torch.Tensor, lr: float, steps: int = 1) -> torch.Tensor:
    """(B, n, dy): the prediction ``W_K q_t`` of :func:`prefix_gd_weights`."""
    return (prefix_gd_weights(x, y, lr, steps) @ queries.double()[..., None])[..., 0]


def _masked_sq(a: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a.pow(2).sum(-1) * mask).sum())


def fit_gd_lr(predictions: torch.Tensor, x: torch.Tensor, y: torch.Tensor, queries: torch.Tensor,
              mask: torch.Tensor, steps: int = 1) -> float:
    """The learning rate minimising ``sum_masked |prediction - GD_K(lr)|^2``: closed form for one step (the GD
    prediction is linear in lr), else a log-spaced search over [1e-3, 1e2] refined by golden-section steps in
    log(lr). Only the masked positions' statistics are kept, so the search is cheap."""
    gram, cross, counts = _prefix_statistics(x, y)
    chosen = mask.bool()
    gram, cross, counts = gram[chosen], cross[chosen], counts.expand(mask.shape)[chosen]
    targets, queries = predictions.double()[chosen], queries.double()[chosen][..., None]

    def predict(lr: float) -> torch.Tensor:
        return (_gd_weights(gram, cross, counts, lr, steps) @ queries)[..., 0]

    if steps == 1:
        unit = predict(1.0)
        return float((targets * unit).sum() / unit.pow(2).sum())

    def distance(log_lr: float) -> float:
        return float((targets - predict(math.exp(log_lr))).pow(2).sum())

    grid = np.linspace(math.log(1e-3), math.log(1e2), 61)
    best = int(np.argmin([distance(g) for g in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if distance(a) < distance(b) else (a, hi)
    return math.exp((lo + hi) / 2)


def compare_with_gd(predictions: torch.Tensor, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor,
                    mask: torch.Tensor, steps: Sequence[int] = (1,), ridge_lam: float = 0.0) -> dict:
    """How close a model's predictions (B, n, dy) are to K steps of GD with the fitted learning rate, for each K in
    ``steps``, on the masked positions; with the losses of the model, of GD and of least squares / ridge.

    ``relative_distance`` is ``sum |model - GD|^2 / sum |GD|^2``; losses are mean squared errors per element.
    """
    mask = mask.double()
    elements = float(mask.sum()) * targets.shape[-1]
    predictions, targets = predictions.double(), targets.double()

    def mse(pred: torch.Tensor) -> float:
        return _masked_sq(pred - targets, mask) / elements

    report = {"model_mse": mse(predictions), "ridge_lam": ridge_lam,
              "ridge_mse": mse(prefix_ridge(x, y, x, ridge_lam)), "gd": []}
    for k in steps:
        lr = fit_gd_lr(predictions, x, y, x, mask, k)
        gd = prefix_gd(x, y, x, lr, k)
        report["gd"].append({"steps": k, "lr": lr, "gd_mse": mse(gd),
                             "relative_distance": _masked_sq(predictions - gd, mask) / _masked_sq(gd, mask)})
    return report


def sensitivity_cosine(model: torch.nn.Module, inputs: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       position: int, lr: float, steps: int = 1) -> float:
    """Mean cosine between ``d prediction / d x_query`` of the model and of K steps of GD (whose prediction
    ``W_K x_q`` has the sensitivity ``W_K``), at token ``position``; scalar labels only. The query's input features
    are the first dx coordinates of its token."""
    if y.shape[-1] != 1:
        raise ValueError("sensitivity_cosine compares gradients of a scalar prediction (dy = 1).")
    inputs = inputs.detach().clone().requires_grad_(True)
    model(inputs).predictions[:, position, 0].sum().backward()
    model_grad = inputs.grad[:, position, : x.shape[-1]].double()
    gd_grad = prefix_gd_weights(x, y, lr, steps)[:, position, 0]  # (B, dx)
    return float(torch.nn.functional.cosine_similarity(model_grad, gd_grad, dim=-1).mean())


def ridge_probe_accuracy(features: torch.Tensor, values: torch.Tensor, lam: float = 1e-3) -> float:
    """Accuracy of a linear probe (one-hot ridge regression with a bias, ``lam`` per sample) of the class ids
    ``values`` (B, T; -100 where none) from ``features`` (B, T, F): fitted on the first half of the sequences, scored
    on the rest."""
    half = features.shape[0] // 2
    if half == 0:
        raise ValueError("A probe needs at least 2 sequences (fit on half, score on the other).")
    has = values >= 0
    features = torch.cat([features.double(), torch.ones_like(features[..., :1], dtype=torch.float64)], dim=-1)
    fit_x, fit_v = features[:half][has[:half]], values[:half][has[:half]]
    test_x, test_v = features[half:][has[half:]], values[half:][has[half:]]
    onehot = torch.nn.functional.one_hot(fit_v, int(values.max()) + 1).double()
    eye = torch.eye(features.shape[-1], dtype=torch.float64)
    probe = torch.linalg.solve(fit_x.T @ fit_x + lam * len(fit_x) * eye, fit_x.T @ onehot)
    return float(((test_x @ probe).argmax(-1) == test_v).double().mean())


@torch.no_grad()
def weights_component_score(model: SequenceModel, inputs: torch.Tensor, values: torch.Tensor) -> float:
    """:func:`ridge_probe_accuracy` of ``values`` from the model's representation (the read-out's input) computed
    under :func:`self_only_mixing`: how well the weights alone decode the context-free target."""
    with self_only_mixing(model):
        hidden = model(inputs).hidden_states
    return ridge_probe_accuracy(hidden, values)


def plateau_length(steps: Sequence[int], losses: Sequence[float], plateau_level: float, final_window: int = 3
                   ) -> int | None:
    """The first step at which ``losses`` fall below ``(plateau_level + final) / 2``, ``final`` the mean of the last
    ``final_window`` points; None when the curve never leaves the plateau (``final`` within 10% of it)."""
    if len(steps) != len(losses) or not losses:
        raise ValueError("plateau_length needs as many steps as losses, and at least one.")
    final = float(np.mean(losses[-final_window:]))
    if final > 0.9 * plateau_level:
        return None
    halfway = (plateau_level + final) / 2
    return next(int(s) for s, loss in zip(steps, losses, strict=True) if loss < halfway)


__all__ = ["compare_with_gd", "fit_gd_lr", "plateau_length", "prefix_gd", "prefix_gd_weights", "prefix_ridge",
           "ridge_probe_accuracy", "sensitivity_cosine", "weights_component_score"]
