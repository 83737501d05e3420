"""Synthetic in-context learning tasks, as seeded streams of examples for ``datasets``.

Every task yields examples with the same three fields, so that one model and one training loop serve all of them:

* ``inputs``: (T, d_in) float32, one feature vector per token;
* ``targets``: (T, d_out) float32 for regression tasks, (T,) int64 class ids for classification tasks;
* ``target_mask``: (T,) float32, 1 where the loss is taken.

plus task-specific fields (the hidden task parameters, the context-free target) for probes. ``examples(seed)`` is an
endless generator (examples are drawn in vectorised blocks of ``block`` from ``numpy.random.default_rng(seed)``);
``as_iterable_dataset(seed)`` streams it as a ``datasets.IterableDataset`` and ``as_dataset(n, seed)`` materialises
its first ``n`` examples as a ``datasets.Dataset`` (the same examples). Task parameters fixed across sequences (the
plateau task's encoder) come from ``structure_seed``, so train and evaluation streams share them.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import numpy as np
from datasets import Dataset, IterableDataset

Example = dict[str, np.ndarray]


def _check_fields(task: object, *positive: str) -> None:
    """Every field of the task's dataclass has its annotated type (int: an int, not a bool; float: a finite number;
    bool: a bool), and the ``positive`` ones are > 0."""
    hints = typing.get_type_hints(type(task))
    for f in fields(task):
        value, kind = getattr(task, f.name), hints[f.name]
        ok = {int: isinstance(value, int) and not isinstance(value, bool),
              float: isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
              bool: isinstance(value, bool)}.get(kind, True)
        if not ok:
            wanted = {float: "a finite number", int: "an int", bool: "a bool"}[kind]
            raise ValueError(f"{type(task).__name__}.{f.name} must be {wanted}, got {value!r}.")
    for name in positive:
        if not getattr(task, name) > 0:
            raise ValueError(f"{type(task).__name__}.{name} must be positive, got {getattr(task, name)!r}.")


class SyntheticTask:
    """Base class: subclasses define ``sample(rng, n, start) -> dict of (n, ...) arrays`` and ``is_regression``."""

    is_regression: bool
    block: int = 256

    def sample(self, rng: np.random.Generator, n: int, start: int) -> Example:
        """``n`` examples (batched arrays); ``start`` is the stream index of the first (used by schedules)."""
        raise NotImplementedError

    def examples(self, seed: int) -> Iterator[Example]:
        """The endless stream of examples of ``seed``: example k is the same whatever is read before or after it."""
        rng = np.random.default_rng(seed)
        start = 0
        while True:
            batch = self.sample(rng, self.block, start)
            for i in range(self.block):
                yield {name: array[i] for name, array in batch.items()}
            start += self.block

    def batch(self, n: int, seed: int) -> Example:
        """The first ``n`` examples of stream ``seed``, stacked: {name: (n, ...) array}."""
        stream = self.examples(seed)
        rows = [next(stream) for _ in range(n)]
        return {name: np.stack([row[name] for row in rows]) for name in rows[0]}

    def as_dataset(self, n: int, seed: int) -> Dataset:
        """The first ``n`` examples of stream ``seed`` as an in-memory ``datasets.Dataset`` (torch format)."""
        return Dataset.from_dict(self.batch(n, seed)).with_format("torch")

    def as_iterable_dataset(self, seed: int) -> IterableDataset:
        """Stream ``seed`` as an endless ``datasets.IterableDataset`` (torch format), for ``Trainer(max_steps=...)``."""
        return IterableDataset.from_generator(self.examples, gen_kwargs={"seed": seed}).with_format("torch")

    def describe(self) -> dict:
        return {"task": type(self).__name__, **asdict(self)}


@dataclass
class LinearRegressionTask(SyntheticTask):
    r"""In-context linear regression (von Oswald et al. 2023, "Transformers learn in-context by gradient descent").

    Per sequence ``w ~ N(0, I_dim)``; ``n_context`` pairs ``x_i ~ U(-1, 1)^dim``, ``y_i = w^T x_i + noise_std * eps``,
    then a query ``x_q``. Tokens are ``e_i = (x_i, y_i)`` and ``e_q = (x_q, 0)``: ``inputs`` (N+1, dim+1);
    ``targets`` (N+1, 1) holds every ``y`` (the query's is ``w^T x_q``, noiseless); the loss is on the query only.
    Extra field ``weights`` (dim,).
    """

    dim: int = 10
    n_context: int = 10
    noise_std: float = 0.0
    is_regression = True

    def __post_init__(self):
        _check_fields(self, "dim", "n_context")
        if self.noise_std < 0:
            raise ValueError(f"LinearRegressionTask.noise_std must be >= 0, got {self.noise_std}.")

    def sample(self, rng: np.random.Generator, n: int, start: int) -> Example:
        length = self.n_context + 1
        w = rng.standard_normal((n, self.dim))
        x = rng.uniform(-1.0, 1.0, (n, length, self.dim))
        y = np.einsum("nd,ntd->nt", w, x)
        y[:, :-1] += self.noise_std * rng.standard_normal((n, self.n_context))
        inputs = np.concatenate([x, y[..., None]], axis=-1)
        inputs[:, -1, -1] = 0.0  # the query's label is what is predicted
        mask = np.zeros((n, length))
        mask[:, -1] = 1.0
        return {"inputs": inputs.astype(np.float32), "targets": y[..., None].astype(np.float32),
                "target_mask": mask.astype(np.float32), "weights": w.astype(np.float32)}


@dataclass
class LinearDynamicsTask(SyntheticTask):
    r"""Linear dynamical systems (von Oswald et al. 2023, "Uncovering mesa-optimization algorithms in Transformers").

    Per sequence ``W = spectral_radius * Q`` with ``Q`` a Haar-random orthogonal (dim, dim) matrix; ``s_1 ~ N(0, I/dim)``,
    ``s_{t+1} = W s_t + noise_std * eps_t``. ``inputs`` = (s_1..s_T), ``targets`` = (s_2..s_{T+1}), both (T, dim);
    the loss is on every position (predict the next state from the past). Extra field ``weights`` (dim, dim).
    """

    dim: int = 10
    length: int = 50
    noise_std: float = 0.01
    spectral_radius: float = 1.0
    is_regression = True

    def __post_init__(self):
        _check_fields(self, "dim", "length", "spectral_radius")
        if self.noise_std < 0:
            raise ValueError(f"LinearDynamicsTask.noise_std must be >= 0, got {self.noise_std}.")

    def sample(self, rng: np.random.Generator, n: int, start: int) -> Example:
        q, r = np.linalg.qr(rng.standard_normal((n, self.dim, self.dim)))
        w = self.spectral_radius * q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]  # Haar measure
        states = np.empty((n, self.length + 1, self.dim))
        states[:, 0] = rng.standard_normal((n, self.dim)) / np.sqrt(self.dim)
        noise = self.noise_std * rng.standard_normal((n, self.length, self.dim))
        for t in range(self.length):
            states[:, t + 1] = np.einsum("nij,nj->ni", w, states[:, t]) + noise[:, t]
        return {"inputs": states[:, :-1].astype(np.float32), "targets": states[:, 1:].astype(np.float32),
                "target_mask": np.ones((n, self.length), np.float32), "weights": w.astype(np.float32)}


@dataclass
class PlateauTask(SyntheticTask):
    r"""In-context classification with a weights component (after Fu et al. 2024, "Breaking through the learning
    plateaus of in-context learning in Transformer").

    Each example draws a value ``v in {0..num_values-1}`` and a latent ``z = mu_v + latent_noise * eps`` (prototypes
    ``mu_v ~ N(0, I_latent_dim)``), observed only through a fixed random encoder ``x = sin(f (z A + a)) B``
    (latent_dim -> encoder_width -> input_dim, ``f = encoder_frequency``). A task is a permutation ``pi`` of the values
    and labels ``y = pi(v)``: ``pi`` is the identity in D_fix and uniformly random per sequence in D_rnd. Decoding
    ``v`` from ``x`` needs the weights (the weights component); ``pi`` needs the context (the context component). The
    encoder's folds make that decoding non-linear: a linear probe of ``x`` recovers ``v`` for about 86% of the tokens
    at f = 4 (100% at f = 1), so the weights have something to learn.

    A sequence is ``n_context`` pairs and a query, one token each for ``x`` and ``y``: ``x_1, y_1, ..., x_n, y_n, x_q``
    (T = 2n+1). ``inputs`` (T, input_dim + num_values): ``x`` tokens carry ``(x, 0)``, label tokens ``(0, onehot(y))``.
    ``targets`` (T,) holds the label at each ``x`` token (-100 elsewhere), ``target_mask`` is 1 on ``x`` tokens;
    ``values`` (T,) the context-free target ``v`` (-100 elsewhere); ``is_fixed`` () whether the sequence is from D_fix.

    Schedules (the paper's first two strategies): the first ``fixed_warmup_examples`` examples of a stream are from
    D_fix, after that each is from D_fix with probability ``fixed_fraction``.
    """

    num_values: int = 8
    n_context: int = 16
    latent_dim: int = 8
    latent_noise: float = 0.3
    encoder_width: int = 64
    encoder_frequency: float = 4.0
    input_dim: int = 32
    fixed_fraction: float = 0.0
    fixed_warmup_examples: int = 0
    structure_seed: int = 0
    is_regression = False

    def __post_init__(self):
        _check_fields(self, "n_context", "latent_dim", "encoder_width", "input_dim", "encoder_frequency")
        if not (isinstance(self.num_values, int) and self.num_values >= 2):
            raise ValueError(f"PlateauTask.num_values must be an int >= 2, got {self.num_values!r}.")
        if not 0.0 <= self.fixed_fraction <= 1.0:
            raise ValueError(f"PlateauTask.fixed_fraction must lie in [0, 1], got {self.fixed_fraction}.")
        if self.fixed_warmup_examples < 0 or self.latent_noise < 0:
            raise ValueError("PlateauTask.fixed_warmup_examples and latent_noise must be >= 0.")
        structure = np.random.default_rng([self.structure_seed, 7])
        self.prototypes = structure.standard_normal((self.num_values, self.latent_dim))
        self.encoder_in = structure.standard_normal((self.latent_dim, self.encoder_width)) / np.sqrt(self.latent_dim)
        self.encoder_bias = structure.standard_normal(self.encoder_width)
        self.encoder_out = structure.standard_normal((self.encoder_width, self.input_dim)) / np.sqrt(self.encoder_width)

    def encode(self, z: np.ndarray) -> np.ndarray:
        """The fixed encoder: (..., latent_dim) latents -> (..., input_dim) observations."""
        return np.sin(self.encoder_frequency * (z @ self.encoder_in + self.encoder_bias)) @ self.encoder_out

    def sample(self, rng: np.random.Generator, n: int, start: int) -> Example:
        k, pairs = self.num_values, self.n_context + 1  # the query is a pair without its label token
        index = start + np.arange(n)
        fixed = (index < self.fixed_warmup_examples) | (rng.random(n) < self.fixed_fraction)
        perms = np.where(fixed[:, None], np.arange(k), rng.random((n, k)).argsort(axis=1))  # (n, k)
        values = rng.integers(0, k, (n, pairs))
        labels = np.take_along_axis(perms, values, axis=1)
        z = self.prototypes[values] + self.latent_noise * rng.standard_normal((n, pairs, self.latent_dim))
        x = self.encode(z)
        length = 2 * pairs - 1
        inputs = np.zeros((n, length, self.input_dim + k), np.float32)
        inputs[:, 0::2, : self.input_dim] = x
        inputs[:, 1::2, self.input_dim :] = np.eye(k)[labels[:, :-1]]
        targets = np.full((n, length), -100, np.int64)
        targets[:, 0::2] = labels
        context_free = np.full((n, length), -100, np.int64)
        context_free[:, 0::2] = values
        mask = np.zeros((n, length), np.float32)
        mask[:, 0::2] = 1.0
        return {"inputs": inputs, "targets": targets, "target_mask": mask, "values": context_free, "is_fixed": fixed}


__all__ = ["LinearDynamicsTask", "LinearRegressionTask", "PlateauTask", "SyntheticTask"]
