"""Few-shot evaluation loop: tasks x modes x shots x seeds, with the learning rate chosen on a separate subset.

Protocol (TinT paper, with one fix): one class-balanced set of k demonstrations per seed, shared by every evaluation
example; a class-balanced *test* subset of the evaluation pool (the reported numbers); and, when several learning
rates are given, a disjoint balanced *dev* subset on which the learning rate is chosen per seed. (The authors' scripts
take the best learning rate on the same examples they report.)
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..simulate import Approximations
from .data import Example
from .modes import DynamicSGD, PlainLM, TinTForward, pad_rows
from .prompts import Context, PromptBuilder
from .sampling import disjoint_subsets, sample_demonstrations
from .scoring import CALIBRATIONS, Mode, calibrate, candidate_log_probs, classification_metrics
from .tasks import Task

MODES = ("icl", "dynamic", "tint")


@dataclass
class ModeConfig:
    """One evaluation mode and its adaptation hyper-parameters.

    Args:
        mode: ``icl``, ``dynamic`` or ``tint``.
        lrs: learning-rate grid of the (summed-loss) step; several values -> chosen on the dev subset.
        n_steps, n_layers: SGD steps and number of top decoder layers updated (dynamic; TinT fixes them at build).
        loss: ``context`` (every training token) or ``label`` (the demonstrations' label words only).
        variant: ``concatenated`` (demos in one sequence, then ICL with demos in context) or ``single`` (each demo
            its own sequence, one shared step, then zero-shot prompts on the updated model; dynamic and tint; TinT
            packs the demonstrations as separate segments in front of each prompt).
        approximations: dynamic only: ``None`` = true SGD, else TinT's approximate step.
        train_on_query: the query tokens also belong to the training part (the paper's transductive setting).
    """

    mode: str = "icl"
    lrs: tuple[float, ...] = (1e-4,)
    n_steps: int = 1
    n_layers: int | None = None
    loss: str = "context"
    variant: str = "concatenated"
    approximations: Approximations | None = None
    train_on_query: bool = False

    def __post_init__(self) -> None:
        checks = [(self.mode in MODES, f"mode={self.mode!r}: use one of {MODES}"),
                  (self.loss in ("context", "label"), f"loss={self.loss!r}: use 'context' or 'label'"),
                  (self.variant in ("concatenated", "single"), f"variant={self.variant!r}: 'concatenated' or 'single'"),
                  (self.variant == "concatenated" or self.mode != "icl", "the single variant needs dynamic or tint"),
                  (self.variant == "concatenated" or not self.train_on_query,
                   "the single variant trains on the demonstrations only; drop train_on_query (--train-on-query)"),
                  (len(self.lrs) > 0, "give at least one learning rate")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")

    @property
    def adaptive(self) -> bool:
        return self.mode != "icl"

    @property
    def label(self) -> str:
        """Short name for tables: e.g. ``dynamic``, ``dynamic/single/label``, ``dynamic/tint-approx``."""
        if not self.adaptive:
            return "icl"
        parts = [self.mode]
        parts += ["single"] if self.variant == "single" else []
        parts += ["label"] if self.loss == "label" else []
        parts += ["query"] if self.train_on_query else []
        parts += ["tint-approx"] if self.approximations is not None else []
        return "/".join(parts)


@dataclass
class FewShotConfig:
    """Sampling, prompting and scoring settings shared by all modes (defaults: the TinT paper's protocol)."""

    shots: tuple[int, ...] = (0, 32)
    seeds: tuple[int, ...] = (1, 2, 3)
    template: int = 0
    calibration: str = "none"
    n_eval: int = 200
    n_dev: int = 100
    eval_seed: int = 0
    balanced: bool = True
    legacy_sampler: bool = False
    batch_size: int = 8
    add_bos: bool | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration={self.calibration!r}: use one of {CALIBRATIONS}.")


@dataclass
class TaskResult:
    """Per-run metrics (one dict per task x mode x shots x seed) and per-example predictions."""

    runs: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)


class FewShotEvaluator:
    """Scores tasks with one model in every mode.

    Args:
        model: the HF causal LM (``icl`` and ``dynamic``).
        tokenizer: its fast tokenizer.
        config: :class:`FewShotConfig`.
        tint_model: a model whose forward takes ``train_mask`` (``tint`` mode), simulating ``model``.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: FewShotConfig,
                 tint_model: nn.Module | None = None):
        self.model, self.tokenizer, self.config, self.tint_model = model, tokenizer, config, tint_model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _mode(self, mode: ModeConfig, lr: float | None, builder: PromptBuilder,
              demos: Sequence[Example]) -> tuple[Mode, Sequence[Example]]:
        """The scoring mode for one demonstration set, and the demonstrations to put in the prompts."""
        label_loss = mode.loss == "label"
        if mode.mode == "icl":
            return PlainLM(self.model), demos
        single = mode.variant == "single"
        if single and not demos:
            return PlainLM(self.model), []
        rows = None
        if single:  # each demonstration its own sequence
            rows = pad_rows([(c.input_ids, c.train_mask, c.label_mask) for c in builder.demonstration_rows(demos)],
                            self.pad_id)
        if mode.mode == "tint":
            if self.tint_model is None:
                raise ValueError("The tint mode needs a TinT model (tint_model=...; `--tint-model` on the CLI).")
            return TinTForward(self.tint_model, lr, label_loss, demonstrations=rows), [] if single else demos
        sgd = DynamicSGD(self.model, lr, mode.n_steps, mode.n_layers, label_loss, mode.approximations)
        if not single:
            return sgd, demos
        return PlainLM(self.model, sgd.update(rows.input_ids, rows.attention_mask, rows.train_mask, rows.loss_mask)), []

    def _reference_contexts(self, builder: PromptBuilder, demos: Sequence[Example]) -> list[Context]:
        if self.config.calibration == "icl_sfc":
            return [builder.premise_context(demos)]
        if self.config.calibration == "contextual":
            return [builder.example_context(demos, x) for x in builder.template.content_free_inputs]
        return []

    def score(self, mode: ModeConfig, lr: float | None, builder: PromptBuilder, demos: Sequence[Example],
              examples: Sequence[Example], desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw and calibrated class scores (N, C) of ``examples`` with demonstrations ``demos``."""
        scorer, context_demos = self._mode(mode, lr, builder, demos)
        contexts = [builder.example_context(context_demos, ex.text) for ex in examples]
        references = self._reference_contexts(builder, context_demos)
        scores = candidate_log_probs(scorer, contexts + references, builder.candidates,
                                     batch_size=self.config.batch_size, pad_id=self.pad_id, desc=desc,
                                     progress=self.config.progress)
        raw = scores[:len(examples)]
        return raw, calibrate(raw, self.config.calibration, scores[len(examples):] if references else None)

    def evaluate_task(self, task: Task, train_pool: Sequence[Example], eval_pool: Sequence[Example],
                      modes: Sequence[ModeConfig]) -> TaskResult:
        """Every mode x shots x seed on the task's test subset; learning rates chosen on the dev subset."""
        cfg = self.config
        template = task.template(cfg.template)
        tune = any(m.adaptive and len(m.lrs) > 1 for m in modes)
        sizes = [cfg.n_eval, cfg.n_dev] if tune else [cfg.n_eval]
        subsets = disjoint_subsets([e.label for e in eval_pool], sizes, cfg.eval_seed, task.num_classes,
                                   cfg.balanced, cfg.legacy_sampler)
        test_idx, dev_idx = subsets[0], subsets[1] if tune else []
        test, dev = [eval_pool[i] for i in test_idx], [eval_pool[i] for i in dev_idx]
        result = TaskResult()
        for mode in modes:
            builder = PromptBuilder(self.tokenizer, template, mode.train_on_query, cfg.add_bos)
            for k in cfg.shots:
                for seed in cfg.seeds[:1] if k == 0 else cfg.seeds:
                    demo_idx = sample_demonstrations([e.label for e in train_pool], k, seed, task.num_classes,
                                                     cfg.balanced, cfg.legacy_sampler)
                    demos = [train_pool[i] for i in demo_idx]
                    where = f"{task.name} {mode.label} k={k} seed={seed}"
                    lr, dev_acc = self._choose_lr(mode, builder, demos, dev, task.num_classes, where)
                    raw, calibrated = self.score(mode, lr, builder, demos, test, f"{where} test")
                    preds = calibrated.argmax(-1).tolist()
                    metrics = classification_metrics(preds, [e.label for e in test], task.num_classes)
                    run = dict(task=task.name, mode=mode.label, shots=k, seed=seed, lr=lr, dev_accuracy=dev_acc,
                               demo_indices=demo_idx, mode_config=_mode_dict(mode), **metrics)
                    result.runs.append(run)
                    result.predictions += [
                        dict(task=task.name, mode=mode.label, shots=k, seed=seed, lr=lr, index=i, label=ex.label,
                             prediction=p, scores=r.tolist(), calibrated_scores=c.tolist())
                        for i, ex, p, r, c in zip(test_idx, test, preds, raw, calibrated)]
        return result

    def _choose_lr(self, mode: ModeConfig, builder: PromptBuilder, demos: Sequence[Example],
                   dev: Sequence[Example], num_classes: int, where: str) -> tuple[float | None, dict[str, float]]:
        if not mode.adaptive:
            return None, {}
        if len(mode.lrs) == 1:
            return mode.lrs[0], {}
        accuracy = {}
        for lr in mode.lrs:
            _, calibrated = self.score(mode, lr, builder, demos, dev, f"{where} dev lr={lr:g}")
            accuracy[repr(lr)] = classification_metrics(calibrated.argmax(-1).tolist(), [e.label for e in dev],
                                                        num_classes)["accuracy"]
        best = max(mode.lrs, key=lambda lr: accuracy[repr(lr)])  # ties: the first in the grid
        return best, accuracy


def _mode_dict(mode: ModeConfig) -> dict:
    out = asdict(mode)
    out["approximations"] = mode.approximations.to_dict() if mode.approximations is not None else None
    return out


def summarize_runs(runs: Sequence[dict], num_classes: dict[str, int]) -> list[dict]:
    """Mean and standard deviation over seeds of accuracy and macro-F1, per task x mode x shots."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["mode"], run["shots"]), []).append(run)
    summary = []
    for (task, mode, shots), group in groups.items():
        acc = [r["accuracy"] for r in group]
        summary.append(dict(task=task, mode=mode, shots=shots, seeds=len(group), n=group[0]["n"],
                            accuracy_mean=statistics.fmean(acc),
                            accuracy_std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
                            macro_f1_mean=statistics.fmean(r["macro_f1"] for r in group),
                            chance=1.0 / num_classes[task], lrs=[r["lr"] for r in group]))
    return summary
