"""Log-likelihood of label words, calibration and metrics: the one scorer of every mode.

For a prompt context c (tokens) and a candidate label continuation w = (w_1..w_m) the score is

    s(w | c) = sum_j log p(w_j | c, w_<j)

read from the logits of the row ``c + w[:-1]`` (as lm-evaluation-harness does). Candidates of one context that are a
single token share one row, so a binary task with one-token label words costs one row per example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from tqdm.auto import tqdm

from .modes import Batch, check_fits, pad_rows
from .prompts import Context

CALIBRATIONS = ("none", "icl_sfc", "contextual")


class Mode(Protocol):
    name: str

    def logits(self, batch: Batch, logits_from: int = 0) -> torch.Tensor:
        """Logits (B, T - logits_from, V) of positions logits_from..T-1 of each row."""


def candidate_log_probs(mode: Mode, contexts: Sequence[Context], candidates: Sequence[Sequence[int]], *,
                        batch_size: int = 8, pad_id: int = 0, desc: str = "scoring",
                        progress: bool = True) -> torch.Tensor:
    """s(candidate | context) for every context and candidate: (N, C) float64."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if not contexts:
        raise ValueError("No contexts to score: the evaluation subset is empty.")
    rows: dict[tuple, int] = {}
    requests = []  # (context n, candidate c, row index, first scored position)
    for n, ctx in enumerate(contexts):
        for c, cand in enumerate(candidates):
            zeros = (0,) * (len(cand) - 1)
            row = (ctx.input_ids + tuple(cand[:-1]), ctx.train_mask + zeros, ctx.label_mask + zeros)
            requests.append((n, c, rows.setdefault(row, len(rows)), len(ctx.input_ids) - 1))
    row_list = list(rows)
    check_fits(mode, max((len(row[0]) for row in row_list), default=0),
               "use fewer shots (--shots), a shorter template, or a model with a longer context")
    needed: dict[int, list[tuple[int, int, int]]] = {}
    for n, c, r, start in requests:
        needed.setdefault(r, []).append((n, c, start))
    scores = torch.zeros(len(contexts), len(candidates), dtype=torch.float64)
    for first in tqdm(range(0, len(row_list), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = row_list[first:first + batch_size]
        # only the candidates' positions are scored: never materialise the logits of the shared demonstrations
        skip = min(start for i in range(len(chunk)) for _, _, start in needed[first + i])
        logits = mode.logits(pad_rows(chunk, pad_id), logits_from=skip)
        for i in range(len(chunk)):
            for n, c, start in needed[first + i]:
                cand = torch.tensor(candidates[c])
                positions = torch.arange(start, start + len(cand)) - skip
                log_probs = torch.log_softmax(logits[i, positions].double(), dim=-1)
                scores[n, c] = log_probs.gather(-1, cand[:, None]).sum()
    return scores


def calibrate(scores: torch.Tensor, method: str, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Calibrated class scores (N, C); the prediction is their argmax.

    * ``none``: s_y.
    * ``icl_sfc`` (the TinT paper; PMI_DC of Holtzman et al. 2021): s_y - r_y, with r_y = s(v(y) | demos + premise),
      ``reference`` of shape (1, C) or (C,).
    * ``contextual`` (Zhao et al. 2021): log p_y - log q_y, where p = softmax(s) over the label words and
      q = mean_m softmax(r_m) over the content-free prompts m, ``reference`` (M, C). This is argmax of
      diag(q)^-1 p, i.e. W = diag(q)^-1, b = 0.
    """
    if method == "none":
        return scores
    if reference is None:
        raise ValueError(f"Calibration {method!r} needs reference scores.")
    reference = reference.reshape(-1, scores.shape[-1]).to(scores.dtype)
    if method == "icl_sfc":
        if reference.shape[0] != 1:
            raise ValueError("icl_sfc takes one reference row (the premise prompt).")
        return scores - reference[0]
    if method == "contextual":
        content_free = torch.softmax(reference, dim=-1).mean(0)
        return torch.log_softmax(scores, dim=-1) - content_free.log()
    raise ValueError(f"Unknown calibration {method!r}; choose one of {CALIBRATIONS}.")


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> dict:
    """Accuracy, macro-F1 (over the classes that occur in ``labels``) and how often each class was predicted."""
    pred, gold = torch.as_tensor(predictions), torch.as_tensor(labels)
    if len(gold) == 0:
        raise ValueError("No examples to score.")
    f1s = []
    for y in range(num_classes):
        tp = ((pred == y) & (gold == y)).sum().item()
        support, predicted = (gold == y).sum().item(), (pred == y).sum().item()
        if support:
            f1s.append(2 * tp / (support + predicted))
    return {
        "accuracy": (pred == gold).double().mean().item(),
        "macro_f1": sum(f1s) / len(f1s),
        "n": len(gold),
        "predicted_counts": torch.bincount(pred, minlength=num_classes).tolist(),
    }
