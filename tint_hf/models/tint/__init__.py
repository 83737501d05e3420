"""TinT: Trainable Transformer in Transformer. Importing registers it with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_tint import TinTConfig
from .modeling_tint import TinTAdaptation, TinTForCausalLM, TinTModel, TinTPreTrainedModel

AutoConfig.register(TinTConfig.model_type, TinTConfig, exist_ok=True)
AutoModel.register(TinTConfig, TinTModel, exist_ok=True)
AutoModelForCausalLM.register(TinTConfig, TinTForCausalLM, exist_ok=True)
# save_pretrained copies this folder's code and writes `auto_map`, so checkpoints load with trust_remote_code=True.
TinTConfig.register_for_auto_class()
TinTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["TinTAdaptation", "TinTConfig", "TinTForCausalLM", "TinTModel", "TinTPreTrainedModel"]
