"""Configuration of MesaLlama: a Llama-family decoder whose chosen layers use the mesa-layer instead of softmax
attention (SmolLM2, Llama, ... : anything ``LlamaConfig`` describes)."""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .configuration_mesa import MesaConfigMixin


@strict
class MesaLlamaConfig(MesaConfigMixin, LlamaConfig):
    r"""Configuration of a :class:`MesaLlamaForCausalLM`: every :class:`~transformers.LlamaConfig` field, the mesa
    fields of ``MesaConfigMixin`` (``configuration_mesa.py``), and

    Args:
        mesa_rope: rotate the mesa layers' queries and keys with the model's RoPE before their L2 normalisation
            (True, the pretrained projections' convention) or not (False: a position-free mesa layer).

    A mesa layer keeps Llama's ``q_proj``/``k_proj``/``v_proj``/``o_proj``; grouped key/value heads each hold one
    state (H, S) shared by their query heads.
    """

    model_type = "mesa_llama"
    # No tensor / pipeline parallel plan: Llama's would shard q/k/v but not the per-head mesa parameters (gates,
    # lambda, output norm) nor the tied head; from_pretrained(tp_plan=...) refuses a model without one.
    base_model_tp_plan = None
    base_model_pp_plan = None

    mesa_rope: bool = True


__all__ = ["MesaLlamaConfig"]
