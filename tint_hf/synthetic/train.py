"""Training a synthetic-task model with the HF ``Trainer`` on a task's endless stream, probing it along the way."""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import torch
from torch import nn
from transformers import PrinterCallback, TrainerCallback, TrainingArguments

from ..training import DecayAwareTrainer
from .tasks import SyntheticTask

Probe = Callable[[nn.Module], dict]


class ProbeCallback(TrainerCallback):
    """Runs ``probe(model)`` (in eval mode, no grad) at step 0 and every ``every`` steps; keeps ``(step, result)``."""

    def __init__(self, probe: Probe, every: int):
        self.probe, self.every, self.history = probe, every, []

    def _run(self, model: nn.Module, step: int) -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.history.append({"step": step, **self.probe(model)})
        model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._run(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._run(model, state.global_step)


def train_on_task(model: nn.Module, task: SyntheticTask, *, steps: int, batch_size: int = 64, lr: float = 1e-3,
                  seed: int = 0, weight_decay: float = 0.0, warmup_steps: int = 0, probe: Probe | None = None,
                  probe_every: int = 100, progress: bool = True, columns: tuple[str, ...] | None = None) -> dict:
    """Train ``model`` in place for ``steps`` optimizer steps on ``task.as_iterable_dataset(seed)`` with AdamW at a
    constant learning rate after ``warmup_steps`` (plateaus are read off the curve, so no decay hides them).

    ``columns``: the dataset fields passed to ``model.forward`` (default inputs, targets, target_mask). Returns
    ``{"train_loss": [{"step", "loss"}...], "probes": [{"step", ...}...]}``.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}.")
    columns = list(columns or ("inputs", "targets", "target_mask"))
    data = task.as_iterable_dataset(seed).select_columns(columns)
    callback = ProbeCallback(probe, probe_every) if probe is not None else None
    with tempfile.TemporaryDirectory(prefix="tint_hf_synthetic_") as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            weight_decay=weight_decay, lr_scheduler_type="constant_with_warmup", warmup_steps=warmup_steps,
            logging_steps=max(1, min(probe_every, steps // 20 or 1)), save_strategy="no", report_to=[], seed=seed,
            use_cpu=not torch.cuda.is_available(), disable_tqdm=not progress, dataloader_num_workers=0,
            remove_unused_columns=False, max_grad_norm=1.0,
        )
        trainer = DecayAwareTrainer(model=model, args=args, train_dataset=data,
                                    callbacks=[callback] if callback else None)
        if not progress:
            trainer.remove_callback(PrinterCallback)  # quiet: no per-log prints either
        trainer.train()
    losses = [{"step": row["step"], "loss": row["loss"]} for row in trainer.state.log_history if "loss" in row]
    model.eval()
    return {"train_loss": losses, "probes": callback.history if callback else []}


__all__ = ["ProbeCallback", "train_on_task"]
