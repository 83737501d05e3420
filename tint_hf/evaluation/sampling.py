"""Demonstration sampling and evaluation subsets.

Both walk one seeded permutation of the pool. A class-balanced draw keeps an example if its class quota is not full
yet, so balanced demonstrations come out in permuted (interleaved) order, as in the TinT authors' ``sample_subset``.
``legacy=True`` uses ``np.random.RandomState(seed).permutation``, which equals the authors' ``np.random.seed(seed);
np.random.permutation(n)`` (paper-identical demonstrations); the default is ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def permutation(n: int, seed: int, legacy: bool = False) -> np.ndarray:
    """A seeded permutation of ``range(n)``."""
    if legacy:
        return np.random.RandomState(seed).permutation(n)
    return np.random.default_rng(seed).permutation(n)


def _quotas(total: int, num_classes: int, balanced: bool, what: str) -> list[int] | None:
    if not balanced:
        return None
    if total % num_classes:
        raise ValueError(f"A class-balanced {what} of {total} needs a multiple of the {num_classes} classes; "
                         f"use {total - total % num_classes or num_classes} or turn balancing off.")
    return [total // num_classes] * num_classes


def disjoint_subsets(labels: Sequence[int], sizes: Sequence[int], seed: int, num_classes: int, balanced: bool = True,
                     legacy: bool = False) -> list[list[int]]:
    """Disjoint index subsets of the given sizes, filled in order from one permutation.

    Each example goes to the first subset that still needs it (with ``balanced``: still needs its class). A size
    larger than the pool allows raises, naming how many were available.
    """
    quotas = [_quotas(size, num_classes, balanced, "subset") for size in sizes]
    subsets: list[list[int]] = [[] for _ in sizes]
    for index in permutation(len(labels), seed, legacy):
        label = int(labels[index])
        for s, size in enumerate(sizes):
            quota = quotas[s]
            if quota is None and len(subsets[s]) < size:
                subsets[s].append(int(index))
                break
            if quota is not None and quota[label] > 0:
                quota[label] -= 1
                subsets[s].append(int(index))
                break
    for subset, size in zip(subsets, sizes):
        if len(subset) < size:
            counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).tolist()
            raise ValueError(f"Could only draw {len(subset)} of {size} examples (class counts in the pool: {counts}, "
                             f"subsets requested: {list(sizes)}); ask for fewer examples.")
    return subsets


def sample_demonstrations(labels: Sequence[int], k: int, seed: int, num_classes: int, balanced: bool = True,
                          legacy: bool = False) -> list[int]:
    """Indices of ``k`` demonstrations from the pool (class-balanced by default), in sampled order."""
    if k == 0:
        return []
    return disjoint_subsets(labels, [k], seed, num_classes, balanced, legacy)[0]
