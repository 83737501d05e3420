"""A synthetic in-context-learning lab: seeded task streams (:mod:`.tasks`), small softmax / mesa / linear
self-attention models (:mod:`.models`), training with the HF ``Trainer`` (:mod:`.train`), probes of the learned
in-context algorithm (:mod:`.probes`) and the experiments of ``tint-hf synthetic`` (:mod:`.experiments`)."""

from .models import LinearSelfAttentionModel, SequenceModel, SyntheticOutput, build_model, self_only_mixing
from .probes import (
                     compare_with_gd,
                     fit_gd_lr,
                     plateau_length,
                     prefix_gd,
                     prefix_gd_weights,
                     prefix_ridge,
                     ridge_probe_accuracy,
                     sensitivity_cosine,
                     weights_component_score,
)
from .tasks import LinearDynamicsTask, LinearRegressionTask, PlateauTask, SyntheticTask
from .train import ProbeCallback, train_on_task

__all__ = ["LinearDynamicsTask", "LinearRegressionTask", "LinearSelfAttentionModel", "PlateauTask", "ProbeCallback",
           "SequenceModel", "SyntheticOutput", "SyntheticTask", "build_model", "compare_with_gd", "fit_gd_lr",
           "plateau_length", "prefix_gd", "prefix_gd_weights", "prefix_ridge", "ridge_probe_accuracy", "self_only_mixing",
           "sensitivity_cosine", "train_on_task", "weights_component_score"]
