"""The three evaluation modes, as "logits of a padded batch" behind one interface.

Every mode gets the same :class:`Batch` (right-padded ``input_ids``, ``attention_mask``, ``train_mask``,
``loss_mask``; all (B, T)) and returns logits (B, T, V); the scorer never knows which mode it talks to:

* :class:`PlainLM` (``icl``): the model as is; the masks are ignored. Any HF causal LM. With ``params`` it runs with
  replaced parameters (the model after the single-FT variant of dynamic evaluation).
* :class:`DynamicSGD` (``dynamic``): per row, SGD on the summed next-token loss of the row's training part
  (targets restricted to ``loss_mask`` for the label-only loss), then the row's logits with the updated weights.
  ``approximations=None`` is true SGD (:func:`tint_hf.simulate.sgd_update`, any HF causal LM); an
  :class:`~tint_hf.simulate.Approximations` uses TinT's approximate step (:func:`tint_hf.simulate.tint_step`).
* :class:`TinTForward` (``tint``): one forward of a model whose ``forward`` takes ``train_mask`` and ``loss_mask``
  (:class:`tint_hf.TinTForCausalLM`), which adapts internally. With ``demonstrations`` (the single-FT variant): one
  simulated step on their summed loss (each its own segment), taken once, then every row alone with those weights;
  a row with training tokens of its own (the query, ``train_on_query``) adds its step to the demonstrations' (exact
  for one step, :meth:`~tint_hf.TinTForCausalLM.adapt` ``add_to``; with more steps the demonstrations are packed in
  front of the row). :class:`DynamicSGD` does the same with true SGD.

The training loss only depends on tokens up to the last training target (causal attention), so rows that share that
prefix share the update. :class:`DynamicSGD` computes it once per distinct prefix and keeps the latest one: with
demonstrations-only training every prompt of a demonstration set reuses a single update.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from ..simulate import Approximations, forward_with_params, sgd_update, tint_step

if TYPE_CHECKING:
    from ..models.tint import TinTAdaptation

MIN_SHARED_PREFIX = 8  # below this many shared leading tokens, prefix caching is not worth a second forward call


@dataclass
class Batch:
    """Right-padded rows: ``input_ids``, ``attention_mask``, ``train_mask``, ``loss_mask``, each (B, T) long."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    train_mask: torch.Tensor
    loss_mask: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The four fields in order, e.g. to build a new Batch field by field."""
        return self.input_ids, self.attention_mask, self.train_mask, self.loss_mask


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Number of leading tokens that every row shares, leaving each row at least one token of its own."""
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    limit = int(attention_mask.sum(-1).min()) - 1
    return int(same[:limit].long().cumprod(0).sum())


def forward_sharing_prefix(model: nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, logits_from: int = 0) -> torch.Tensor:
    """Logits (B, T - logits_from, V) of right-padded rows with (shared) replaced ``params``, running a common prefix
    only once; positions before ``logits_from`` get no logits (a 32-shot prompt's demonstrations would otherwise
    cost B x T x V floats).

    Rows of a few-shot evaluation share the demonstrations: their keys/values are computed for one row, repeated
    B times as the KV cache, and only the suffixes run batched. Same result as :func:`forward_with_params`
    (up to floating-point summation order).
    """
    batch = input_ids.shape[0]
    prefix = shared_prefix_length(input_ids, attention_mask) if batch > 1 else 0
    arguments = inspect.signature(model.forward).parameters
    # transformers >= 5.24 names the cache `cache`; remote-code models written earlier still say `past_key_values`
    cache_name = next((name for name in ("cache", "past_key_values") if name in arguments), None)
    if prefix < MIN_SHARED_PREFIX or "position_ids" not in arguments or cache_name is None:
        return forward_with_params(model, params, input_ids, attention_mask)[:, logits_from:]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    with torch.no_grad():
        head = functional_call(model, params, args=(input_ids[:1, :prefix],),
                               kwargs=dict(position_ids=positions[:, :prefix], use_cache=True))
        cache = head[cache_name]
        cache.batch_repeat_interleave(batch)
        tail = functional_call(model, params, args=(input_ids[:, prefix:],),
                               kwargs={"attention_mask": attention_mask, cache_name: cache, "use_cache": True,
                                       "position_ids": positions[:, prefix:].expand(batch, -1)})
    if logits_from >= prefix:
        return tail.logits[:, logits_from - prefix:]
    return torch.cat([head.logits[:, logits_from:].expand(batch, -1, -1), tail.logits], dim=1)


def position_limit(model: nn.Module) -> int | None:
    """The longest input ``model`` takes (its position table or trained context; None if the config has none)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def check_fits(mode, length: int, fix: str) -> None:
    """Raise if rows of ``length`` tokens are longer than ``mode.model`` takes, with the length, the limit and
    ``fix`` (instead of an IndexError deep inside the position embedding)."""
    limit = position_limit(getattr(mode, "model", None))
    if limit is not None and length > limit:
        raise ValueError(f"Inputs of {length} tokens are longer than {type(mode.model).__name__} takes "
                         f"({limit} positions, max_position_embeddings); {fix}.")


def pad_rows(rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]], pad_id: int) -> Batch:
    """Right-pad (ids, train_mask, label_mask) triples into a :class:`Batch`."""
    width = max(len(ids) for ids, _, _ in rows)

    def padded(values: Sequence[int], fill: int) -> list[int]:
        return list(values) + [fill] * (width - len(values))

    return Batch(
        input_ids=torch.tensor([padded(ids, pad_id) for ids, _, _ in rows]),
        attention_mask=torch.tensor([padded([1] * len(ids), 0) for ids, _, _ in rows]),
        train_mask=torch.tensor([padded(train, 0) for _, train, _ in rows]),
        loss_mask=torch.tensor([padded(label, 0) for _, _, label in rows]),
    )


def stack_rows(first: Batch, second: Batch) -> Batch:
    """The rows of ``first`` then those of ``second``, right-padded to one length (padding: id 0, masks 0)."""
    length = max(first.input_ids.shape[1], second.input_ids.shape[1])

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, length - t.shape[1]))

    return Batch(*(torch.cat([padded(a), padded(b)]) for a, b in zip(first.tensors(), second.tensors(), strict=True)))


def stack_columns(first: Batch, second: Batch) -> Batch:
    """Each row of ``first`` followed by the same row of ``second`` (same row count): (B, T1 + T2)."""
    return Batch(*(torch.cat([a, b], dim=1) for a, b in zip(first.tensors(), second.tensors(), strict=True)))


class PlainLM:
    """``icl`` mode: the causal LM as is, or with the parameters in ``params`` replaced."""

    name = "icl"

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor] | None = None):
        self.model = model
        self.params = params or {}

    def logits(self, batch: Batch, logits_from: int = 0) -> torch.Tensor:
        return forward_sharing_prefix(self.model, self.params, batch.input_ids, batch.attention_mask, logits_from)


class DynamicSGD:
    """``dynamic`` mode: real SGD on each row's training part (see the module docstring).

    Args:
        model: any HF causal LM (OPT / GPT-2 / Llama families with ``approximations``); never modified.
        lr: step size on the **summed** training loss.
        num_steps: SGD steps; num_layers: update the top n decoder layers (+ final norm), None = all.
        label_loss: train only on ``loss_mask`` targets (the demonstrations' label words).
        approximations: ``None`` for true SGD, else TinT's approximate step with these switches.
    """

    name = "dynamic"
    _ORIGINAL: dict[str, torch.Tensor] = {}  # rows without training targets: the model's own parameters (read-only)

    def __init__(self, model: nn.Module, lr: float, num_steps: int = 1, num_layers: int | None = None,
                 label_loss: bool = False, approximations: Approximations | None = None,
                 demonstrations: Batch | None = None):
        """``demonstrations``: right-padded rows (one per demonstration, fully in the training part) for the single-FT
        variant: every scored row is predicted after one shared step on their summed loss plus, when the row has
        training tokens of its own (the query, with ``train_on_query``), that row's tokens in the same step."""
        self.model, self.lr, self.num_steps, self.num_layers = model, lr, num_steps, num_layers
        self.label_loss, self.approximations = label_loss, approximations
        self.demonstrations = demonstrations
        self._cached: tuple[tuple, dict[str, torch.Tensor]] | None = None
        self._demonstrations_step: dict[str, torch.Tensor] | None = None

    def _training_prefix(self, batch: Batch, b: int) -> int:
        """Length of row b's prefix that holds all its training targets (0 if it has none)."""
        real = batch.attention_mask[b].bool()
        targets = batch.train_mask[b].bool() & real
        if self.label_loss:
            targets &= batch.loss_mask[b].bool()
        positions = targets[1:].nonzero()  # a target is a token t+1 >= 1 predicted from position t
        return int(positions[-1]) + 2 if len(positions) else 0

    def update(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, train_mask: torch.Tensor,
               loss_mask: torch.Tensor | None, shared: bool = True) -> dict[str, torch.Tensor]:
        """Updated parameters after SGD on the training targets; ``shared``: one step on the sum over rows."""
        loss_mask = loss_mask if self.label_loss else None
        kwargs = dict(lr=self.lr, num_steps=self.num_steps, num_layers=self.num_layers)
        if self.approximations is None:
            return sgd_update(self.model, input_ids, attention_mask, train_mask, loss_mask, per_sequence=not shared,
                              **kwargs)
        out = tint_step(self.model, input_ids, attention_mask, train_mask, loss_mask, approximations=self.approximations,
                        return_params=True, **kwargs)
        if not shared:
            return out.params
        # One step on the summed loss of the rows: TinT's approximate gradient is a sum over training tokens, so the
        # shared change is the sum of the rows' changes.
        original = dict(self.model.named_parameters())
        return {name: original[name].detach() + (rows - original[name].detach()).sum(0)
                for name, rows in out.params.items()}

    def demonstrations_step(self) -> dict[str, torch.Tensor]:
        """The single-FT step on the demonstrations alone, taken once."""
        if self._demonstrations_step is None:
            self._demonstrations_step = self.update(*self.demonstrations.tensors())
        return self._demonstrations_step

    def _row_params(self, batch: Batch, b: int) -> dict[str, torch.Tensor]:
        n = self._training_prefix(batch, b)
        if n == 0:
            return self._ORIGINAL if self.demonstrations is None else self.demonstrations_step()
        key = tuple(tuple(t[b, :n].tolist()) for t in (batch.input_ids, batch.train_mask, batch.loss_mask))
        if self._cached is None or self._cached[0] != key:
            row = Batch(*(t[b:b + 1, :n] for t in batch.tensors()))
            if self.demonstrations is None:
                params = self.update(row.input_ids, None, row.train_mask, row.loss_mask)
            elif self.num_steps == 1:  # one step sums per-sequence gradients at the same weights: add the row's part
                original = dict(self.model.named_parameters())
                own = self.update(row.input_ids, None, row.train_mask, row.loss_mask)
                params = {name: value + own[name] - original[name].detach()
                          for name, value in self.demonstrations_step().items()}
            else:  # later steps depend on the earlier ones: one joint step on the demonstrations and the row
                params = self.update(*stack_rows(self.demonstrations, row).tensors())
            self._cached = (key, params)
        return self._cached[1]

    def logits(self, batch: Batch, logits_from: int = 0) -> torch.Tensor:
        groups: dict[int, tuple[dict[str, torch.Tensor], list[int]]] = {}
        for b in range(batch.input_ids.shape[0]):
            params = self._row_params(batch, b)
            groups.setdefault(id(params), (params, []))[1].append(b)
        out = None
        for params, rows in groups.values():
            logits = forward_sharing_prefix(self.model, params, batch.input_ids[rows], batch.attention_mask[rows],
                                            logits_from)
            if out is None:
                out = logits.new_empty((batch.input_ids.shape[0],) + logits.shape[1:])
            out[rows] = logits
        return out




def available_memory(model: nn.Module) -> int | None:
    """Bytes free on ``model``'s device now (CUDA: the device's free memory; CPU: MemAvailable of /proc/meminfo);
    None where it cannot be read."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def rows_that_fit(model: nn.Module, rows: int, tokens: int, budget: int | None) -> int:
    """How many of ``rows`` rows of ``tokens`` positions, each training on its own tokens, one TinT call may take so
    that their steps (``model.step_bytes_per_row``) fit ``budget`` bytes (None: half the memory available now); a row
    that cannot fit alone is refused with the numbers."""
    per_row = model.step_bytes_per_row(tokens) if hasattr(model, "step_bytes_per_row") else 0
    budget = budget if budget is not None else available_memory(model) // 2
    if not per_row or budget is None:
        return rows
    if per_row > budget:
        raise MemoryError(f"One row's own TinT step needs about {per_row / 2**20:,.0f} MiB and "
                          f"{budget / 2**20:,.0f} MiB are free for it (--tint-memory-gib, default half the free "
                          "memory): simulate fewer layers (--layers), use a smaller model or a machine with more "
                          "memory, or keep the query out of the training part (--train-on-query).")
    return max(1, min(rows, budget // per_row))


def accepts_training_masks(model: nn.Module) -> bool:
    return "train_mask" in inspect.signature(model.forward).parameters


class TinTForward:
    """``tint`` mode: one forward of a model that adapts on ``train_mask`` internally (e.g. ``TinTForCausalLM``)."""

    name = "tint"

    def __init__(self, model: nn.Module, inner_lr: float | None = None, label_loss: bool = False,
                 demonstrations: Batch | None = None, memory_budget: int | None = None):
        """``demonstrations``: right-padded rows (one per demonstration, fully in the training part) for the single-FT
        variant: packed as segments 0..k-1, they are trained on once (``model.adapt``), and every scored row is
        predicted alone with those weights (the same as packing them in front of each row, see
        :meth:`tint_hf.TinTForCausalLM.adapt`).

        Rows that train on their own tokens each hold their own update (factors of 2 N d numbers per updated slot
        for N training tokens) and the activations of their own step (``model.step_bytes_per_row(tokens)``, an
        estimate from the shapes): a batch is split into as many calls as keep that within ``memory_budget`` bytes
        (default: half the memory available now), and a single row that does not fit is refused with the numbers,
        not left to the OOM killer."""
        if not accepts_training_masks(model):
            raise TypeError(f"{type(model).__name__}.forward takes no `train_mask`: the tint mode needs a TinT model "
                            f"(tint_hf.TinTForCausalLM, e.g. built with `tint-hf build`). Use icl or dynamic instead.")
        self.model, self.inner_lr, self.label_loss = model, inner_lr, label_loss
        self.demonstrations = demonstrations
        self.memory_budget = memory_budget
        self._adaptation = None

    def rows_per_call(self, rows: int, tokens: int) -> int:
        """How many rows of ``tokens`` positions that train on their own tokens one call may take (see
        ``__init__``)."""
        return rows_that_fit(self.model, rows, tokens, self.memory_budget)

    def adaptation(self) -> TinTAdaptation:
        """The single-FT step on the demonstrations, taken on first use and kept for every later batch."""
        if self._adaptation is None:
            demos, segments = _pack_segments(self.demonstrations)
            with torch.no_grad():
                self._adaptation = self.model.adapt(
                    demos.input_ids, demos.attention_mask, demos.train_mask,
                    demos.loss_mask if self.label_loss else None, inner_lr=self.inner_lr, segment_ids=segments)
        return self._adaptation

    def logits(self, batch: Batch, logits_from: int = 0) -> torch.Tensor:
        own_targets = bool((batch.train_mask.bool() & batch.attention_mask.bool()).any())
        rows = batch.input_ids.shape[0]
        step = self.rows_per_call(rows, batch.input_ids.shape[1]) if own_targets else rows
        if step < rows:  # memory: a per-row update for every row of the call
            return torch.cat([self._logits(Batch(*(t[i:i + step] for t in batch.tensors())), logits_from, True)
                              for i in range(0, rows, step)])
        return self._logits(batch, logits_from, own_targets)

    def _logits(self, batch: Batch, logits_from: int, own_targets: bool) -> torch.Tensor:
        keep = batch.input_ids.shape[1] - logits_from
        loss_mask = batch.loss_mask if self.label_loss else None
        with torch.no_grad():
            if self.demonstrations is None:  # each row trains on its own training part
                return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep,
                                  train_mask=batch.train_mask, loss_mask=loss_mask, inner_lr=self.inner_lr).logits
            if not own_targets:  # single-FT: the rows only read the demonstrations' step
                adaptation = self.adaptation()
            elif self.model.config.num_steps == 1:  # ... plus each row's own step (the query), added to it: exact
                adaptation = self.model.adapt(batch.input_ids, batch.attention_mask, batch.train_mask, loss_mask,
                                              inner_lr=self.inner_lr, add_to=self.adaptation())
            else:  # later steps depend on earlier ones: the demonstrations packed in front of every row, one pass
                demos, segments = _pack_segments(self.demonstrations)
                rows = batch.input_ids.shape[0]
                joined = stack_columns(Batch(*(t.expand(rows, -1) for t in demos.tensors())), batch)
                segments = torch.cat([segments.expand(rows, -1),
                                      torch.full_like(batch.input_ids, int(segments.max()) + 1)], dim=1)
                return self.model(input_ids=joined.input_ids, attention_mask=joined.attention_mask,
                                  train_mask=joined.train_mask, loss_mask=joined.loss_mask if self.label_loss else None,
                                  segment_ids=segments, inner_lr=self.inner_lr, logits_to_keep=keep).logits
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep,
                              adaptation=adaptation).logits


def _pack_segments(rows: Batch) -> tuple[Batch, torch.Tensor]:
    """The real tokens of right-padded rows laid end to end as one row (1, P), and their segment ids (1, P)."""
    real = rows.attention_mask.bool()
    packed = Batch(*(t[real][None] for t in rows.tensors()))
    segments = torch.arange(real.shape[0])[:, None].expand_as(real)[real][None]
    return packed, segments
