"""The mesa family: MesaOPT and MesaLlama (decoders with mesa-layers), their shared mixer, op and config fields.

* ``configuration_mesa.py``: the mesa fields (``MesaConfigMixin``); ``configuration_mesa_{opt,llama}.py``.
* ``mesa_op.py``: the op in its fast forms; ``mesa_naive.py``: the same maths token by token (the reference).
* ``mesa_layer.py``: the token mixer (``MesaAttention``) and its cache layer; ``modeling_mesa.py``: what both models
  share around it; ``modeling_mesa_{opt,llama}.py``: the models.

Each model's ``save_pretrained`` copies its modeling file and what it imports from this folder, so a checkpoint
carries exactly its own code (``trust_remote_code=True``). Importing registers both with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_mesa_llama import MesaLlamaConfig
from .configuration_mesa_opt import MesaOPTConfig
from .mesa_layer import MesaStateLayer
from .modeling_mesa_llama import MesaLlamaForCausalLM, MesaLlamaModel, MesaLlamaPreTrainedModel
from .modeling_mesa_opt import MesaOPTForCausalLM, MesaOPTModel, MesaOPTPreTrainedModel

for config, base, causal_lm in ((MesaOPTConfig, MesaOPTModel, MesaOPTForCausalLM),
                                (MesaLlamaConfig, MesaLlamaModel, MesaLlamaForCausalLM)):
    AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(config, base, exist_ok=True)
    AutoModelForCausalLM.register(config, causal_lm, exist_ok=True)
    # save_pretrained copies the model's code and writes `auto_map`: checkpoints load with trust_remote_code=True
    config.register_for_auto_class()
    causal_lm.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MesaLlamaConfig", "MesaLlamaForCausalLM", "MesaLlamaModel", "MesaLlamaPreTrainedModel", "MesaOPTConfig",
           "MesaOPTForCausalLM", "MesaOPTModel", "MesaOPTPreTrainedModel", "MesaStateLayer"]
