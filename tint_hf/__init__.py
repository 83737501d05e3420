"""tint_hf: Trainable Transformer in Transformer (TinT) and mesa-layer OPT models for HuggingFace Transformers.

Importing the package registers its models with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``.
"""

from . import assets
from .models.mesa import (
    MesaLlamaConfig,
    MesaLlamaForCausalLM,
    MesaLlamaModel,
    MesaOPTConfig,
    MesaOPTForCausalLM,
    MesaOPTModel,
)
from .models.tint import TinTAdaptation, TinTConfig, TinTForCausalLM, TinTModel

__version__ = "0.1.0"

__all__ = ["assets", "MesaLlamaConfig", "MesaLlamaForCausalLM", "MesaLlamaModel", "MesaOPTConfig", "MesaOPTForCausalLM", "MesaOPTModel", "TinTAdaptation", "TinTConfig", "TinTForCausalLM", "TinTModel"]
