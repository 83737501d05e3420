"""tint_hf's modes as an lm-evaluation-harness model: any lm-eval task, scored after learning from its own context.

Importing this module (it needs ``lm_eval``; ``pip install tint_hf[lm-eval]``) registers the model ``tint-hf``::

    tint-hf lm-eval run --model tint-hf --model_args pretrained=PATH,mode=tint,inner_lr=1e-4,layers=12 \\
        --tasks NAME --include_path FOLDER --num_fewshot 4 --batch_size 8

(``tint-hf lm-eval ARGS`` is lm-eval's own command line with this module imported first.) Model arguments:

* ``pretrained``: a causal LM folder or Hub id (a TinT checkpoint for ``mode=tint``, or any OPT / GPT-2 / Llama-family
  model, from which TinT is then constructed at load); ``tokenizer`` (default: ``pretrained``), ``dtype``.
* ``mode``: ``icl`` (the model as is), ``dynamic`` (a real SGD step on the context, :func:`tint_hf.simulate.sgd_update`,
  then the continuation with the updated weights) or ``tint`` (TinT's simulated step, :meth:`TinTForCausalLM.adapt`,
  then the continuation with the adapted weights).
* ``inner_lr`` (step size on the summed loss, default 1e-4), ``layers`` (top L layers updated; default all),
  ``num_steps`` (default 12 / L as in the paper, 1 for all layers), ``num_prefixes`` (when TinT is built here),
  ``tint_memory_gib`` (memory for the steps TinT takes together, default half the free memory).
* ``train_on``: ``context`` (every context token, the TinT authors' protocol: the query included) or
  ``demonstrations`` (only the few-shot examples: the context up to its last ``fewshot_delimiter``, default
  "\\n\\n"; a 0-shot context then has nothing to train on and is scored as ``icl``).

``loglikelihood``: requests that share a context share one step, taken once (``steps_taken`` counts them); only the
continuation positions get logits. ``loglikelihood_rolling`` is the TinT paper's language-modelling protocol, *not*
lm-eval's rolling perplexity: each document is cut into windows of ``window`` tokens, the first ``train_fraction``
of each window is the training part (context for ``icl``), and only the rest of each window is scored.
``generate_until``: adapt on the context, then greedy generation with the adapted weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from torch import nn
from tqdm.auto import tqdm

from ..simulate import sgd_update
from .fewshot import MODES, steps_for_layers
from .modes import Batch, PlainLM, check_fits, pad_rows, position_limit, rows_that_fit

TRAIN_ON = ("context", "demonstrations")


@register_model("tint-hf")
class AdaptiveLM(TemplateLM):
    """An lm-eval model that adapts on each request's context (see the module docstring for the arguments)."""

    def __init__(self, pretrained: str | nn.Module, mode: str = "icl", inner_lr: float | None = None,
                 layers: int | None = None, num_steps: int | None = None, train_on: str | None = None,
                 num_prefixes: int | None = None, tokenizer=None, dtype: str = "float32", batch_size: int | str = 8,
                 fewshot_delimiter: str = "\n\n", train_fraction: float = 0.5, window: int | None = None,
                 device: str = "cpu", max_batch_size: int | None = None, tint_memory_gib: float | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..models.tint import TinTForCausalLM

        _check(mode in MODES, "mode", mode, f"one of {MODES}")
        if mode == "icl":  # the model as is: the adaptation options would be ignored
            for name, value in (("inner_lr", inner_lr), ("layers", layers), ("num_steps", num_steps),
                                ("train_on", train_on), ("num_prefixes", num_prefixes)):
                _check(value is None, name, value, "absent with mode=icl (it takes no step)")
        inner_lr = 1e-4 if inner_lr is None else inner_lr
        train_on = train_on or "context"
        _check(train_on in TRAIN_ON, "train_on", train_on, f"one of {TRAIN_ON}")
        _check(isinstance(inner_lr, int | float) and math.isfinite(inner_lr) and inner_lr >= 0, "inner_lr", inner_lr,
               "a finite number >= 0")
        _check(layers is None or (isinstance(layers, int) and layers >= 1), "layers", layers, "an integer >= 1")
        _check(num_steps is None or (isinstance(num_steps, int) and num_steps >= 1), "num_steps", num_steps, "an integer >= 1")
        if isinstance(batch_size, str) and batch_size.isdigit():  # lm-eval's --batch_size arrives as text
            batch_size = int(batch_size)
        _check(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size,
               "an integer >= 1 (tint-hf does not search for a batch size: 'auto' is not supported)")
        _check(0 < train_fraction < 1, "train_fraction", train_fraction, "a number in (0, 1)")
        _check(dtype in ("float32", "float64", "bfloat16"), "dtype", dtype, "float32, float64 or bfloat16")
        if mode != "tint":
            _check(num_prefixes is None, "num_prefixes", num_prefixes, "given only with mode=tint")
            _check(tint_memory_gib is None, "tint_memory_gib", tint_memory_gib, "given only with mode=tint")
        _check(tint_memory_gib is None or (isinstance(tint_memory_gib, int | float) and tint_memory_gib > 0),
               "tint_memory_gib", tint_memory_gib, "a number > 0 (GiB)")
        try:
            num_steps = steps_for_layers(layers, num_steps)
        except ValueError as error:
            raise ValueError(f"tint-hf lm-eval model: layers={layers}: {error}; pass num_steps (--model_args "
                             "num_steps=...).") from None
        _check(max_batch_size is None, "max_batch_size", max_batch_size,
               "absent: it bounds lm-eval's batch size search (batch_size=auto), which tint-hf does not do")
        _check(not str(device).startswith("cuda") or torch.cuda.is_available(), "device", device,
               "a device this machine has (no CUDA here: pass --device cpu to lm-eval)")
        torch_dtype = getattr(torch, dtype)
        model = pretrained if isinstance(pretrained, nn.Module) else AutoModelForCausalLM.from_pretrained(
            pretrained, dtype=torch_dtype)
        model = model.to(device).eval()
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or pretrained)
        self.tokenizer = tokenizer
        self.mode, self.inner_lr, self.layers, self.num_steps, self.train_on = mode, inner_lr, layers, num_steps, train_on
        self.batch_size, self.fewshot_delimiter = batch_size, fewshot_delimiter
        self.train_fraction, self._device = train_fraction, torch.device(device)
        self.memory_budget = None if tint_memory_gib is None else int(tint_memory_gib * 2**30)
        self.steps_taken = 0  # training steps (one per distinct training part), for the record and the tests
        self._last = None  # (training tokens, weights) of the latest step: consecutive requests reuse it
        if mode == "tint" and not isinstance(model, TinTForCausalLM):
            model = TinTForCausalLM.from_auxiliary(model, num_prefixes=num_prefixes, num_simulation_layers=layers,
                                                   num_steps=num_steps).to(device)
        elif mode == "tint":
            _check(num_prefixes is None and layers is None, "num_prefixes / layers", (num_prefixes, layers),
                   "absent for a TinT checkpoint (its construction fixes them)")
        self.model = model
        limit = position_limit(model)
        self.window = window or limit or 1024
        _check(isinstance(self.window, int) and self.window >= 2, "window", self.window, "an integer >= 2")

    # -- what TemplateLM needs -----------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    # -- adaptation ----------------------------------------------------------------------------------------------
    def training_part(self, context: str, context_ids: Sequence[int]) -> int:
        """How many leading context tokens are trained on: all of them (``train_on=context``), or those of the
        few-shot examples, up to and including the context's last ``fewshot_delimiter`` (found by the tokens'
        character offsets: "\n\n" is one token at the end of a string and two before a word in GPT-2's BPE)."""
        if self.train_on == "context":
            return len(context_ids)
        cut = context.rfind(self.fewshot_delimiter)
        if cut < 0:
            return 0
        end = cut + len(self.fewshot_delimiter)  # characters of the few-shot examples and their delimiters
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("train_on=demonstrations finds the few-shot examples' tokens by character offsets, which "
                             "needs a fast tokenizer (tokenizer.json); use train_on=context or a fast tokenizer.")
        encoded = self.tokenizer(context.rstrip(" "), add_special_tokens=False, return_offsets_mapping=True)
        if list(encoded["input_ids"]) != list(context_ids):
            raise ValueError("train_on=demonstrations: the context's tokens are not those of its text (a BOS or "
                             "other special token was added); use train_on=context.")
        inside = [stop <= end for _, stop in encoded["offset_mapping"]]
        straddles = any(start < end < stop for start, stop in encoded["offset_mapping"])
        if straddles:
            raise ValueError("train_on=demonstrations: a token spans the end of the few-shot examples (the tokenizer "
                             f"merges across the fewshot_delimiter {self.fewshot_delimiter!r}); pass the task's "
                             "delimiter as fewshot_delimiter=..., or use train_on=context.")
        return sum(inside)

    def adapted(self, ids: Sequence[int], n_train: int):
        """The weights after the step on the first ``n_train`` tokens of ``ids``: parameters for ``dynamic``, a
        :class:`~tint_hf.TinTAdaptation` for ``tint``, None (the model as is) for ``icl`` or nothing to train on."""
        if self.mode == "icl" or n_train < 2 or self.inner_lr == 0:
            return None
        key = tuple(ids[:n_train])
        if self._last is not None and self._last[0] == key:  # e.g. every question after the same demonstrations
            return self._last[1]
        self._last = (key, self._step(key))
        return self._last[1]

    def _step(self, training: tuple[int, ...]):
        tokens = torch.tensor([list(training)], device=self.device)
        self.steps_taken += 1
        train = torch.ones_like(tokens)
        if self.mode == "dynamic":
            return sgd_update(self.model, tokens, None, train, None, lr=self.inner_lr, num_steps=self.num_steps,
                              num_layers=self.layers, per_sequence=False)
        with torch.no_grad():
            return self.model.adapt(tokens, train_mask=train, inner_lr=self.inner_lr)

    def logits(self, rows: Sequence[Sequence[int]], weights, logits_from: int) -> torch.Tensor:
        """Logits (B, T - logits_from, V) of right-padded ``rows`` with the weights of :meth:`adapted`."""
        batch = Batch(*(t.to(self.device) for t in pad_rows([(r, [0] * len(r), [0] * len(r)) for r in rows],
                                                             self.pad_id).tensors()))
        if self.mode == "tint":
            with torch.no_grad():
                return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, adaptation=weights,
                                  train_mask=batch.train_mask if weights is None else None,
                                  logits_to_keep=batch.input_ids.shape[1] - logits_from).logits
        return PlainLM(self.model, weights).logits(batch, logits_from)

    # -- requests ------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) per request. Requests with one training part share one step.
        ``icl`` / ``dynamic``: consecutive requests with the same weights (every request for ``icl``; one question's
        choices; every question after the same demonstrations) are batched together, up to ``batch_size`` rows.
        ``tint``: the steps of the training parts of up to ``batch_size`` requests are taken together (one TinT call
        with one update per training part, kept as factors), then those requests are scored in one batch. Contexts
        are taken longest first."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, ((context, _), context_ids, _) in enumerate(requests):
            groups.setdefault((tuple(context_ids), self.training_part(context, context_ids)), []).append(i)
        bar = tqdm(total=len(groups), desc=f"tint-hf {self.mode}", disable=disable_tqdm)
        pending: list[tuple[int, list[int], int, int]] = []  # (request, row, first scored position, update index)
        # longest contexts first (as HFLM orders them): rows of similar length share a batch, with little padding
        items, weights = sorted(groups.items(), key=lambda item: -len(item[0][0])), None
        while items:
            if self.mode == "tint":  # as many training parts as fit one batch of requests (and memory), together
                chunk = [items.pop(0)]
                while items and sum(len(m) for _, m in chunk) + len(items[0][1]) <= self.batch_size:
                    chunk.append(items.pop(0))
                longest = max(n for (_, n), _ in chunk)
                fits = rows_that_fit(self.model, len(chunk), longest, self.memory_budget) if longest >= 2 else len(chunk)
                items[:0], chunk = chunk[fits:], chunk[:fits]
                weights = self._adapt_together([key for key, _ in chunk])
            else:  # one training part; its requests join the pending batch while the weights stay the same
                chunk = [items.pop(0)]
                adapted = self.adapted(*chunk[0][0])
                if pending and adapted is not weights:
                    self._score(requests, pending, weights, results)
                weights = adapted
            for index, ((context_ids, _), members) in enumerate(chunk):
                for i in members:
                    row = list(context_ids) + list(requests[i][2])[:-1]
                    distinct = _distinct_rows(pending)
                    if len(distinct) == self.batch_size and (tuple(row), index) not in distinct:
                        self._score(requests, pending, weights, results)  # full: a new row starts the next batch
                    pending.append((i, row, len(context_ids) - 1, index))
            if self.mode == "tint" and pending:
                self._score(requests, pending, weights, results)
            bar.update(len(chunk))
        if pending:
            self._score(requests, pending, weights, results)
        bar.close()
        return results

    def _adapt_together(self, parts: list[tuple[tuple[int, ...], int]]):
        """TinT's step on several training parts (context tokens, how many train) at once: a
        :class:`~tint_hf.TinTAdaptation` with one update per part, or None when none has anything to train on."""
        trained = [n for _, n in parts if n >= 2]
        if not trained or self.inner_lr == 0:
            return None
        self.steps_taken += len(trained)
        rows = pad_rows([(ids[:max(n, 1)], [int(n >= 2)] * max(n, 1), [0] * max(n, 1)) for ids, n in parts],
                        self.pad_id)  # a part with nothing to train on gets a zero update
        batch = Batch(*(t.to(self.device) for t in rows.tensors()))
        with torch.no_grad():
            return self.model.adapt(batch.input_ids, batch.attention_mask, batch.train_mask, inner_lr=self.inner_lr)

    def _score(self, requests, pending: list, weights, results: list) -> None:
        """Score the ``pending`` requests (request, row, first scored position, update index) in one batch with
        ``weights`` (for ``tint`` an adaptation holding one update per index), then empty ``pending``. Requests with
        the same row and weights (the choices of a question whose continuations are one token) share one row."""
        distinct = _distinct_rows(pending)
        check_fits(self, max(len(row) for row, _ in distinct), "use fewer shots or a model with a longer context")
        skip = min(start for _, _, start, _ in pending)
        if self.mode == "tint" and weights is not None:
            weights = weights.select(torch.tensor([index for _, index in distinct], device=self.device))
        logits = self.logits([list(row) for row, _ in distinct], weights, skip)
        for i, row, start, index in pending:
            continuation = torch.tensor(requests[i][2], device=logits.device)
            scored = logits[distinct[(tuple(row), index)], start - skip: start - skip + len(continuation)]
            log_probs = torch.log_softmax(scored.double(), dim=-1)
            greedy = bool((log_probs.argmax(-1) == continuation).all())
            results[i] = (float(log_probs.gather(-1, continuation[:, None]).sum()), greedy)
        pending.clear()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The TinT paper's perplexity protocol per window (see the module docstring): the summed log-probability of
        the scored tokens of each document."""
        out = []
        for request in tqdm(requests, desc=f"tint-hf {self.mode} rolling", disable=disable_tqdm):
            (text,) = request.args
            ids = [self.prefix_token_id] + self.tok_encode(text)
            total = 0.0
            for first in range(0, len(ids) - 1, self.window):
                window = ids[first:first + self.window]
                n_train = max(1, int(self.train_fraction * len(window)))
                if len(window) - n_train < 1:
                    continue
                weights = self.adapted(window, n_train)
                logits = self.logits([window[:-1]], weights, n_train - 1)[0]
                targets = torch.tensor(window[n_train:], device=logits.device)
                total += float(torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).sum())
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Adapt on each context, then greedy decoding with the adapted weights until a stop string or
        ``max_gen_toks`` tokens."""
        out = []
        for request in tqdm(requests, desc=f"tint-hf {self.mode} generate", disable=disable_tqdm):
            context, options = request.args
            until = options.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.get("max_gen_toks", 256))
            ids = self.tok_encode(context)
            weights = self.adapted(ids, self.training_part(context, ids))
            generated: list[int] = []
            text = ""
            for _ in range(max_new):
                row = ids + generated
                check_fits(self, len(row), "ask for fewer tokens (max_gen_toks) or a shorter context")
                token = int(self.logits([row], weights, len(row) - 1)[0, -1].argmax())
                if token == self.eot_token_id:
                    break
                generated.append(token)
                text = self.tokenizer.decode(generated)
                stops = [text.index(stop) for stop in until if stop in text]
                if stops:
                    text = text[: min(stops)]
                    break
            out.append(text)
        return out


def _distinct_rows(pending: list) -> dict[tuple, int]:
    """(row tokens, update index) of the pending requests -> its row in the scored batch, in order of appearance."""
    distinct: dict[tuple, int] = {}
    for _, row, _, index in pending:
        distinct.setdefault((tuple(row), index), len(distinct))
    return distinct


def _check(ok: bool, name: str, value, what: str) -> None:
    if not ok:
        raise ValueError(f"tint-hf lm-eval model: {name}={value!r} must be {what} (--model_args {name}=...).")


__all__ = ["TRAIN_ON", "AdaptiveLM"]
