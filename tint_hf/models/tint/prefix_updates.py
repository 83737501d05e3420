"""Updated prefixes kept as the prefixes before the step plus the step's factors, one set per row.

TinT's descent heads add to a simulated d x d linear slot (W, b) the sum over a row's training positions

    W <- W - sum_t lr_t dy_t x_t^T,        b <- b - sum_t lr_t dy_t,

and to a normalisation's diagonal gain ``gamma <- gamma - sum_t lr_t dy_t * x_hat_t``. Written into the prefix
layout, every row that trains on its own tokens holds a copy of every updated prefix (d^2 numbers per slot and MLP
chunk). Kept as factors, the row holds L = (lr_t dy_t) and X = (x_t) for its N training positions (2 N d numbers),
and the updated slot is applied without ever being formed:

    x W'^T + b' = (x W^T + b) - (x X^T) L - sum_t L_t         (forward, TinTLinearForward)
    W'^T dy    = W^T dy - (dy L^T) X                          (backward heads, TinTLinearBackwardDescent)

(a diagonal update g adds ``- g * x`` and ``- g * dy``). This is the same arithmetic as the dense update in another
order: equal in exact arithmetic, to rounding in floating point. :func:`compact` forms the dense prefixes whenever
they are the smaller of the two (N > about d / 2, or one row whose update every row shares).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class FactoredPrefix:
    """Prefixes ``base`` (R, [G,] P, D) plus per-row updates (B rows; R = 1 or B), applied as factors.

    ``left`` (B, [G,] N, d): lr_t dy_t; ``right`` (B, [G | 1,] N, d): x_t (the weight update is ``-left^T right``);
    ``diag`` (B, [G,] d): a diagonal weight update (``-diag(diag)``); ``bias`` (B, [G,] d): the bias update
    (``-bias``). Absent parts are None. G indexes maps applied in parallel (e.g. MLP chunks), as in the prefixes.
    """

    base: torch.Tensor
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    diag: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def _parts(self) -> list[torch.Tensor]:
        return [t for t in (self.left, self.right, self.diag, self.bias) if t is not None]

    def tensors(self) -> list[torch.Tensor]:
        """The base and the factors."""
        return [self.base, *self._parts()]

    @property
    def rows(self) -> int:
        return max([self.base.shape[0]] + [t.shape[0] for t in self._parts()])

    def _map(self, fn) -> FactoredPrefix:
        return FactoredPrefix(*(None if (t := getattr(self, f.name)) is None else fn(t) for f in fields(self)))

    def unsqueeze(self, dim: int) -> FactoredPrefix:
        """A G axis of size 1 at ``dim`` (1: after the batch axis), as ``Tensor.unsqueeze`` on the prefixes."""
        return self._map(lambda t: t.unsqueeze(dim))

    def squeeze(self, dim: int) -> FactoredPrefix:
        return self._map(lambda t: t.squeeze(dim))

    def select(self, rows: torch.Tensor) -> FactoredPrefix:
        """The updates of the given rows (B',); a shared base (R = 1) stays shared."""
        return FactoredPrefix(*(None if (t := getattr(self, f.name)) is None
                                else t if t.shape[0] == 1 else t[rows] for f in fields(self)))

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """What the per-row updates add to ``x W^T + b``: x (B, [G,] T, d) -> (B, [G,] T, d)."""
        out = torch.zeros((), dtype=x.dtype, device=x.device)
        if self.left is not None:
            out = out - (x @ self.right.transpose(-1, -2)) @ self.left
        if self.diag is not None:
            out = out - x * self.diag.unsqueeze(-2)
        if self.bias is not None:
            out = out - self.bias.unsqueeze(-2)
        return out

    def transposed_correction(self, dy: torch.Tensor) -> torch.Tensor:
        """What the per-row updates add to ``W^T dy``: dy (B, [G,] T, d) -> (B, [G,] T, d)."""
        out = torch.zeros((), dtype=dy.dtype, device=dy.device)
        if self.left is not None:
            out = out - (dy @ self.left.transpose(-1, -2)) @ self.right
        if self.diag is not None:
            out = out - dy * self.diag.unsqueeze(-2)
        return out

    def plus(self, left: torch.Tensor | None = None, right: torch.Tensor | None = None,
             diag: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> FactoredPrefix:
        """These prefixes with a further update (same conventions) added: factors concatenated over N, vectors summed."""
        return FactoredPrefix(self.base, _concat(self.left, left), _concat(self.right, right),
                              _sum(self.diag, diag), _sum(self.bias, bias))

    def dense(self) -> torch.Tensor:
        """The updated prefixes written out, (B, [G,] P, D): the weight update in the weight slots, the bias update
        in prefix 0's bias slot (the one TinT reads)."""
        parts = self._parts()
        if not parts:
            return self.base
        d = parts[0].shape[-1]
        weight = None
        if self.left is not None:
            weight = self.left.transpose(-1, -2) @ self.right                                # (B, [G,] d, d)
        if self.diag is not None:
            weight = torch.diag_embed(self.diag) if weight is None else weight + torch.diag_embed(self.diag)
        shape = torch.broadcast_shapes(self.base.shape, (self.rows, *self.base.shape[1:]))
        delta = self.base.new_zeros(shape)
        if weight is not None:
            delta[..., :-d] = weight.reshape(*weight.shape[:-2], shape[-2], -1)
        if self.bias is not None:
            delta[..., 0, -d:] = self.bias
        return self.base - delta

    def factor_numel(self) -> int:
        """Numbers held per row by the updates (the base excluded)."""
        return sum(t[0].numel() for t in self._parts())


Prefix = torch.Tensor | FactoredPrefix  # prefixes as TinT's modules take them


def factored(prefix: Prefix) -> FactoredPrefix:
    return prefix if isinstance(prefix, FactoredPrefix) else FactoredPrefix(prefix)


def compact(prefix: Prefix) -> Prefix:
    """The smaller form of ``prefix``: the factors, or the dense prefixes when those take no more memory (per row)."""
    if not isinstance(prefix, FactoredPrefix):
        return prefix
    if prefix.factor_numel() >= prefix.base[0].numel() or not prefix._parts():
        return prefix.dense()
    return prefix


def rows_of(prefix: Prefix) -> int:
    return prefix.rows if isinstance(prefix, FactoredPrefix) else prefix.shape[0]


def tensors_of(prefix: Prefix) -> list[torch.Tensor]:
    return prefix.tensors() if isinstance(prefix, FactoredPrefix) else [prefix]


def select_rows(prefix: Prefix, rows: torch.Tensor) -> Prefix:
    """Prefixes of the given rows; shared ones (leading dim 1) stay as they are."""
    if isinstance(prefix, FactoredPrefix):
        return prefix.select(rows)
    return prefix if prefix.shape[0] == 1 else prefix[rows]


def add_update(base: Prefix, new: Prefix, start: torch.Tensor) -> Prefix:
    """``base + (new - start)``: the update that took ``start`` to ``new``, added to ``base``. When ``new`` holds
    its update as factors over ``start`` itself, the factors are carried over and nothing dense is formed."""
    base, new = factored(base), factored(new)
    shift = base.base if new.base is start else base.base + (new.base - start)
    return compact(replace(new, base=shift).plus(base.left, base.right, base.diag, base.bias))


def _concat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Concatenate factors over their N axis (-2), broadcasting every other axis."""
    if a is None or b is None:
        return b if a is None else a
    shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return torch.cat([a.expand(*shape, *a.shape[-2:]), b.expand(*shape, *b.shape[-2:])], dim=-2)


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a + b


__all__ = ["FactoredPrefix", "add_update", "compact", "factored", "rows_of", "select_rows", "tensors_of"]
