"""Few-shot evaluation loop: tasks x modes x shots x seeds, with the learning rate chosen per seed.

Protocol (TinT paper, with one fix): one class-balanced set of k demonstrations per seed, shared by every evaluation
example; a class-balanced *test* subset of the evaluation pool (the reported numbers); and, when several learning
rates are given, a disjoint balanced *dev* subset. ``select="dev"`` chooses the learning rate per seed on the dev
subset (ours); ``select="test"`` takes the best one on the test subset itself, as the authors' scripts do (an oracle
number); ``select="both"`` reports both rows. Each (task, mode, k, seed) cell is written to a :class:`~tint_hf.runstore.RunStore`
as soon as it is done, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..runstore import RunStore
from ..simulate import Approximations
from .data import Example
from .modes import DynamicSGD, PlainLM, TinTForward, pad_rows
from .prompts import Context, PromptBuilder
from .sampling import disjoint_subsets, sample_demonstrations
from .scoring import CALIBRATIONS, Mode, calibrate, candidate_log_probs, classification_metrics
from .tasks import Task

MODES = ("icl", "dynamic", "tint")
SELECTIONS = ("dev", "test", "both")
LAYER_STEP_BUDGET = 12  # the paper: the top L layers get 12 / L SGD steps (L = 12, 6, 3)


def steps_for_layers(layers: int | None, num_steps: int | None = None) -> int:
    """SGD steps when the top ``layers`` layers are updated: ``num_steps`` if given, else the paper's 12 / L (one step
    when every layer is updated, ``layers=None``). Raises ValueError when 12 / L is no whole number."""
    if num_steps is not None:
        return num_steps
    if layers is None:
        return 1
    if layers < 1 or LAYER_STEP_BUDGET % layers:
        raise ValueError(f"the paper's budget of {LAYER_STEP_BUDGET} layer-steps gives no whole number of steps for "
                         f"{layers} layers")
    return LAYER_STEP_BUDGET // layers


@dataclass
class ModeConfig:
    """One evaluation mode and its adaptation hyper-parameters.

    Args:
        mode: ``icl``, ``dynamic`` or ``tint``.
        lrs: learning-rate grid of the (summed-loss) step; several values -> chosen on the dev subset.
        num_steps, num_layers: SGD steps and number of top decoder layers updated (dynamic; TinT fixes them at build).
        loss: ``context`` (every training token) or ``label`` (the demonstrations' label words only).
        variant: ``concatenated`` (demos in one sequence, then ICL with demos in context) or ``single`` (each demo
            its own sequence, one shared step, then zero-shot prompts on the updated model; dynamic and tint; TinT
            packs the demonstrations as separate segments in front of each prompt).
        approximations: dynamic only: ``None`` = true SGD, else TinT's approximate step.
        train_on_query: the query tokens also belong to the training part (the TinT authors' context loss, in both
            variants and at k = 0, where the query is all there is to train on).
    """

    mode: str = "icl"
    lrs: tuple[float, ...] = (1e-4,)
    num_steps: int = 1
    num_layers: int | None = None
    loss: str = "context"
    variant: str = "concatenated"
    approximations: Approximations | None = None
    train_on_query: bool = False

    def __post_init__(self) -> None:
        checks = [(self.mode in MODES, f"mode={self.mode!r}: use one of {MODES}"),
                  (self.loss in ("context", "label"), f"loss={self.loss!r}: use 'context' or 'label'"),
                  (self.variant in ("concatenated", "single"), f"variant={self.variant!r}: 'concatenated' or 'single'"),
                  (self.variant == "concatenated" or self.mode != "icl", "the single variant needs dynamic or tint"),
                  (self.mode != "icl" or not self.train_on_query, "icl takes no training part (train_on_query)"),
                  (len(self.lrs) > 0, "give at least one learning rate"),
                  (self.num_steps >= 1, f"num_steps={self.num_steps}: use at least one step"),
                  (self.num_layers is None or self.num_layers >= 1, f"num_layers={self.num_layers}: use None (all) or >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")

    @property
    def adaptive(self) -> bool:
        return self.mode != "icl"

    @property
    def label(self) -> str:
        """Short name for tables: e.g. ``dynamic``, ``dynamic/single/label``, ``tint/label/L3x4`` (top 3 layers, 4
        steps), ``dynamic/tint-approx``."""
        if not self.adaptive:
            return "icl"
        parts = [self.mode]
        parts += ["single"] if self.variant == "single" else []
        parts += ["label"] if self.loss == "label" else []
        parts += ["query"] if self.train_on_query else []
        parts += ["tint-approx"] if self.approximations is not None else []
        if self.num_layers is not None or self.num_steps != 1:
            parts.append(f"L{self.num_layers or 'all'}x{self.num_steps}")
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
    select: str = "dev"
    tint_memory_budget: int | None = None  # bytes for the tint mode's per-row steps (None: half the free memory)

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration={self.calibration!r}: use one of {CALIBRATIONS}.")
        if self.select not in SELECTIONS:
            raise ValueError(f"select={self.select!r}: use one of {SELECTIONS}.")

    @property
    def selections(self) -> tuple[str, ...]:
        return ("dev", "test") if self.select == "both" else (self.select,)


@dataclass
class TaskResult:
    """Per-run metrics (one dict per task x mode x shots x seed) and per-example predictions."""

    runs: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)


TintSource = nn.Module | Callable[[int | None, int], nn.Module]


def cell_key(task: str, mode: str, shots: int, seed: int) -> str:
    """The key of one (task, mode label, k, seed) cell in the run store."""
    return f"{task}|{mode}|k={shots}|seed={seed}"


class FewShotEvaluator:
    """Scores tasks with one model in every mode.

    Args:
        model: the HF causal LM (``icl`` and ``dynamic``).
        tokenizer: its fast tokenizer.
        config: :class:`FewShotConfig`.
        tint_model: for the ``tint`` mode, a model whose forward takes ``train_mask`` simulating ``model``, or a
            function ``(num_layers, num_steps) -> model`` that builds one per grid point (the last one is kept).
        store: a :class:`~tint_hf.runstore.RunStore` to resume from and write finished cells to (``None``: keep nothing).
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: FewShotConfig,
                 tint_model: TintSource | None = None, store: RunStore | None = None):
        self.model, self.tokenizer, self.config, self.store = model, tokenizer, config, store
        self._tint_source = tint_model
        self._tint_built: tuple[tuple, nn.Module] | None = None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def tint_model_for(self, mode: ModeConfig) -> nn.Module:
        """The TinT model simulating ``mode.num_layers`` top layers for ``mode.num_steps`` steps."""
        source = self._tint_source
        if source is None:
            raise ValueError("The tint mode needs a TinT model (tint_model=...; `--tint-model` on the CLI).")
        if isinstance(source, nn.Module):
            config = source.config
            layers = config.num_simulation_layers if mode.num_layers is None else mode.num_layers  # None: the model's own
            if (layers, mode.num_steps) != (config.num_simulation_layers, config.num_steps):
                raise ValueError(f"The TinT model simulates {config.num_simulation_layers} layers x {config.num_steps} "
                                 f"steps, the grid asks for {layers} x {mode.num_steps}: pass a builder instead of a "
                                 f"model (on the CLI: drop --tint-model, or match --layers and --num-steps to it).")
            return source
        key = (mode.num_layers, mode.num_steps)
        if self._tint_built is None or self._tint_built[0] != key:
            self._tint_built = None  # free the previous one before building the next
            self._tint_built = (key, source(mode.num_layers, mode.num_steps))
        return self._tint_built[1]

    def _mode(self, mode: ModeConfig, lr: float | None, builder: PromptBuilder,
              demos: Sequence[Example]) -> tuple[Mode, Sequence[Example]]:
        """The scoring mode for one demonstration set, and the demonstrations to put in the prompts."""
        label_loss = mode.loss == "label"
        if mode.mode == "icl":
            return PlainLM(self.model), demos
        single = mode.variant == "single"
        if single and not demos and not mode.train_on_query:
            return PlainLM(self.model), []
        rows = None
        if single and demos:  # each demonstration its own sequence
            rows = pad_rows([(c.input_ids, c.train_mask, c.label_mask) for c in builder.demonstration_rows(demos)],
                            self.pad_id)
        context_demos = [] if single else demos  # single-FT prompts are zero-shot (their query may still train)
        if mode.mode == "tint":
            return TinTForward(self.tint_model_for(mode), lr, label_loss, demonstrations=rows,
                               memory_budget=self.config.tint_memory_budget), context_demos
        return DynamicSGD(self.model, lr, mode.num_steps, mode.num_layers, label_loss, mode.approximations,
                          demonstrations=rows), context_demos

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
        """Every mode x shots x seed on the task's test subset; learning rates chosen as ``config.select`` says.
        Cells already in the store are read back, not recomputed."""
        cfg = self.config
        template = task.template(cfg.template)
        tune = any(m.adaptive and len(m.lrs) > 1 for m in modes)
        sizes = [cfg.n_eval, cfg.n_dev] if tune and "dev" in cfg.selections else [cfg.n_eval]
        subsets = disjoint_subsets([e.label for e in eval_pool], sizes, cfg.eval_seed, task.num_classes,
                                   cfg.balanced, cfg.legacy_sampler)
        test_idx, dev_idx = subsets[0], subsets[1] if len(subsets) > 1 else []
        result = TaskResult()
        for mode in modes:
            builder = PromptBuilder(self.tokenizer, template, mode.train_on_query, cfg.add_bos)
            for k in cfg.shots:
                for seed in cfg.seeds[:1] if k == 0 else cfg.seeds:
                    key = cell_key(task.name, mode.label, k, seed)
                    cell = self.store.get(key) if self.store is not None else None
                    if cell is None:
                        demo_idx = sample_demonstrations([e.label for e in train_pool], k, seed, task.num_classes,
                                                         cfg.balanced, cfg.legacy_sampler)
                        runs, predictions = self._cell(task, mode, builder, k, seed, demo_idx, train_pool, eval_pool,
                                                       test_idx, dev_idx)
                        if self.store is not None:
                            self.store.put(key, dict(runs=runs, predictions=predictions))
                        cell = dict(runs=runs, predictions=predictions)
                    result.runs += cell["runs"]
                    result.predictions += cell["predictions"]
        return result

    def _cell(self, task: Task, mode: ModeConfig, builder: PromptBuilder, k: int, seed: int, demo_idx: list[int],
              train_pool: Sequence[Example], eval_pool: Sequence[Example], test_idx: list[int],
              dev_idx: list[int]) -> tuple[list[dict], list[dict]]:
        """One (mode, k, seed) cell: a run (and its test predictions) per selection rule."""
        demos = [train_pool[i] for i in demo_idx]
        test, dev = [eval_pool[i] for i in test_idx], [eval_pool[i] for i in dev_idx]
        labels = [e.label for e in test]
        where = f"{task.name} {mode.label} k={k} seed={seed}"
        scored: dict[float | None, tuple[torch.Tensor, torch.Tensor]] = {}

        def on_test(lr: float | None) -> tuple[torch.Tensor, torch.Tensor]:
            if lr not in scored:
                suffix = "" if lr is None else f" lr={lr:g}"
                scored[lr] = self.score(mode, lr, builder, demos, test, f"{where} test{suffix}")
            return scored[lr]

        def accuracy(calibrated: torch.Tensor, gold: list[int]) -> float:
            return classification_metrics(calibrated.argmax(-1).tolist(), gold, task.num_classes)["accuracy"]

        choices: list[tuple[str | None, float | None, dict]] = []  # (selection rule, lr, accuracy by lr)
        if not mode.adaptive or len(mode.lrs) == 1:
            choices.append((None, mode.lrs[0] if mode.adaptive else None, {}))
        else:
            for rule in self.config.selections:
                if rule == "dev":
                    by_lr = {repr(lr): accuracy(self.score(mode, lr, builder, demos, dev, f"{where} dev lr={lr:g}")[1],
                                                [e.label for e in dev]) for lr in mode.lrs}
                else:
                    by_lr = {repr(lr): accuracy(on_test(lr)[1], labels) for lr in mode.lrs}
                choices.append((rule, max(mode.lrs, key=lambda lr: by_lr[repr(lr)]), by_lr))  # ties: the first
        runs, predictions = [], []
        for rule, lr, by_lr in choices:
            raw, calibrated = on_test(lr)
            preds = calibrated.argmax(-1).tolist()
            runs.append(dict(task=task.name, mode=mode.label, shots=k, seed=seed, lr=lr, selection=rule,
                             selection_accuracy=by_lr, dev_accuracy=by_lr if rule == "dev" else {},
                             demo_indices=demo_idx, mode_config=_mode_dict(mode),
                             **classification_metrics(preds, labels, task.num_classes)))
            predictions += [
                dict(task=task.name, mode=mode.label, shots=k, seed=seed, lr=lr, selection=rule, index=i,
                     label=ex.label, prediction=p, scores=r.tolist(), calibrated_scores=c.tolist())
                for i, ex, p, r, c in zip(test_idx, test, preds, raw, calibrated)]
        return runs, predictions


def _mode_dict(mode: ModeConfig) -> dict:
    out = asdict(mode)
    out["approximations"] = mode.approximations.to_dict() if mode.approximations is not None else None
    return out


def at_grid_edge(value: float, grid: Sequence[float]) -> bool:
    """Whether ``value``, chosen from ``grid`` (two or more values), is its smallest or largest value: the optimum
    may lie outside the grid, so the grid should be widened."""
    return len(grid) > 1 and value in (min(grid), max(grid))


def lr_at_grid_edge(run: dict) -> bool:
    """Whether a run's learning rate was chosen from a grid and landed at its edge (:func:`at_grid_edge`)."""
    return bool(run.get("selection")) and at_grid_edge(run["lr"], (run.get("mode_config") or {}).get("lrs") or [])


def summarize_runs(runs: Sequence[dict], num_classes: dict[str, int]) -> list[dict]:
    """Mean and standard deviation over seeds of accuracy and macro-F1, per task x mode x shots x selection rule."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["mode"], run["shots"], run.get("selection")), []).append(run)
    summary = []
    for (task, mode, shots, selection), group in groups.items():
        acc = [r["accuracy"] for r in group]
        summary.append(dict(task=task, mode=mode, shots=shots, selection=selection, seeds=len(group), n=group[0]["n"],
                            accuracy_mean=statistics.fmean(acc),
                            accuracy_std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
                            macro_f1_mean=statistics.fmean(r["macro_f1"] for r in group),
                            chance=1.0 / num_classes[task], lrs=[r["lr"] for r in group],
                            lr_at_edge=sum(map(lr_at_grid_edge, group))))
    return summary
