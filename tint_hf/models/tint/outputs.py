"""What TinT's models return, and the checks of the output options they do not support."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput


@dataclass
class TinTModelOutput(ModelOutput):
    """``last_hidden_state``: final-LN output after the simulated step(s) (B, T, d);
    ``hidden_state_before``: the same for the first (un-updated) simulated pass, if requested;
    ``eval_targets``: (B, T-1) bool, the positions whose next token is an evaluation target."""

    last_hidden_state: torch.Tensor | None = None
    hidden_state_before: torch.Tensor | None = None
    eval_targets: torch.Tensor | None = None


@dataclass
class TinTCausalLMOutput(ModelOutput):
    """``logits`` after the internal update; ``loss`` = mean NLL of ``labels`` on the evaluation part;
    ``logits_before`` / ``loss_before`` for the auxiliary model before the update, if requested."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    logits_before: torch.Tensor | None = None
    loss_before: torch.Tensor | None = None


def refuse_outputs(model: nn.Module, output_hidden_states: bool | None, output_attentions: bool | None) -> None:
    """TinT's internal states are not the auxiliary model's: asking for them (argument or config) raises."""
    for name, flag in (("output_hidden_states", output_hidden_states), ("output_attentions", output_attentions)):
        if flag if flag is not None else getattr(model.config, name, False):
            raise ValueError(f"{type(model).__name__} does not return {name.removeprefix('output_')}; drop "
                             f"{name}=True (argument or config).")


def as_requested(model: nn.Module, output: ModelOutput, return_dict: bool | None) -> ModelOutput | tuple:
    """``output``, or its tuple when ``return_dict`` (default ``config.return_dict``) is False."""
    return output if (model.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


__all__ = ["TinTCausalLMOutput", "TinTModelOutput", "as_requested", "refuse_outputs"]
