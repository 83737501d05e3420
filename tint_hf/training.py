"""Training helpers for tint_hf models with the HF ``Trainer``."""

from __future__ import annotations

from torch import nn
from transformers import Trainer


def no_weight_decay_names(model: nn.Module) -> frozenset[str]:
    """Parameter-name components a model asks to keep out of weight decay (``_no_weight_decay_parameters``).

    MesaOPT lists its ridge ``lambda_params``: decaying them would pull lambda towards ``softplus(0) + lambda_min``
    rather than leave the regulariser to the data. Wrappers (peft, DDP) forward the attribute lookup.
    """
    return frozenset(getattr(model, "_no_weight_decay_parameters", ()))


class DecayAwareTrainer(Trainer):
    """``transformers.Trainer`` that also exempts each model's :func:`no_weight_decay_names` from weight decay
    (besides the biases and norms the stock Trainer exempts)."""

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        exempt = no_weight_decay_names(model)
        return [name for name in super().get_decay_parameter_names(model) if not exempt.intersection(name.split("."))]


__all__ = ["DecayAwareTrainer", "no_weight_decay_names"]
