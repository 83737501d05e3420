"""MesaLlama: Llama-family decoders with mesa-layers. Importing registers it with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_mesa_llama import MesaLlamaConfig
from .modeling_mesa_llama import MesaLlamaForCausalLM, MesaLlamaModel, MesaLlamaPreTrainedModel

AutoConfig.register(MesaLlamaConfig.model_type, MesaLlamaConfig, exist_ok=True)
AutoModel.register(MesaLlamaConfig, MesaLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(MesaLlamaConfig, MesaLlamaForCausalLM, exist_ok=True)
# save_pretrained copies this folder's code and writes `auto_map`, so checkpoints load with trust_remote_code=True.
MesaLlamaConfig.register_for_auto_class()
MesaLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MesaLlamaConfig", "MesaLlamaForCausalLM", "MesaLlamaModel", "MesaLlamaPreTrainedModel"]
