"""``generate()`` for TinT: every step re-runs the simulation (and the step) on the sequence so far, with TinT's own
arguments carried along and its masks grown over the generated tokens."""

from __future__ import annotations

import torch
from transformers import GenerationMixin

from .sequence_masks import default_train_mask

GENERATION_ARGUMENTS = ("train_mask", "loss_mask", "segment_ids", "position_ids", "inner_lr", "logits_to_keep",
                        "adaptation")


class TinTGenerationMixin(GenerationMixin):
    """HF's ``GenerationMixin`` with TinT's arguments (for :class:`TinTForCausalLM`, which has ``self.model``)."""

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """``GenerationMixin.generate`` with TinT's arguments (``train_mask``, ``loss_mask``, ``segment_ids``,
        ``inner_lr``, ``position_ids``) passed to every step; masks grow with the generated tokens, which are never
        training tokens. Without ``train_mask`` the training part is :func:`.sequence_masks.default_train_mask` of the
        *prompt*, fixed for the whole generation (with ``adaptation=``: none, the step is already taken). Every step
        re-runs the simulation on the sequence so far."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if kwargs.get("train_mask") is None and kwargs.get("adaptation") is None and prompt is not None:
            kwargs["train_mask"] = default_train_mask(prompt, kwargs.get("attention_mask"),
                                                      self.config.default_train_fraction)
        return super().generate(inputs, generation_config, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        """The whole sequence so far (no cache) and the call's TinT arguments."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        inputs.update({name: kwargs[name] for name in GENERATION_ARGUMENTS if kwargs.get(name) is not None})
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs: dict, is_encoder_decoder: bool = False,
                                            num_new_tokens: int = 1) -> dict:
        """HF's update (attention mask, positions), then the TinT masks over the new tokens: ``train_mask`` and
        ``loss_mask`` 0, ``segment_ids`` those of the last segment."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        for name in ("train_mask", "loss_mask", "segment_ids"):
            if (mask := model_kwargs.get(name)) is not None:
                new = mask[:, -1:].expand(-1, num_new_tokens) if name == "segment_ids" else mask.new_zeros(
                    mask.shape[0], num_new_tokens)
                model_kwargs[name] = torch.cat([mask, new], dim=-1)
        return model_kwargs


__all__ = ["GENERATION_ARGUMENTS", "TinTGenerationMixin"]
