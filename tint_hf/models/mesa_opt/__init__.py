"""MesaOPT: OPT with mesa-layers. Importing registers it with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_mesa_opt import MesaOPTConfig
from .modeling_mesa_opt import MesaOPTForCausalLM, MesaOPTModel, MesaOPTPreTrainedModel, MesaStateLayer

AutoConfig.register(MesaOPTConfig.model_type, MesaOPTConfig, exist_ok=True)
AutoModel.register(MesaOPTConfig, MesaOPTModel, exist_ok=True)
AutoModelForCausalLM.register(MesaOPTConfig, MesaOPTForCausalLM, exist_ok=True)
# save_pretrained copies this folder's code and writes `auto_map`, so checkpoints load with trust_remote_code=True.
MesaOPTConfig.register_for_auto_class()
MesaOPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MesaOPTConfig", "MesaOPTForCausalLM", "MesaOPTModel", "MesaOPTPreTrainedModel", "MesaStateLayer"]
