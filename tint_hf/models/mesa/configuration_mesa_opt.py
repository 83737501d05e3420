"""Configuration of MesaOPT: OPT whose chosen decoder layers use the mesa-layer instead of softmax attention."""

from huggingface_hub.dataclasses import strict
from transformers import OPTConfig

from .configuration_mesa import MesaConfigMixin


@strict
class MesaOPTConfig(MesaConfigMixin, OPTConfig):
    r"""Configuration of a :class:`MesaOPTForCausalLM`: every :class:`~transformers.OPTConfig` field, plus the mesa
    fields of ``MesaConfigMixin`` (``configuration_mesa.py``: ``mesa_layers``, ``mesa_solver``, ``cg_steps``, gates,
    ``short_conv_size``, ``use_output_gate``, ``mesa_backend``, ...).

    A mesa layer keeps OPT's ``q_proj``/``k_proj``/``v_proj``/``out_proj`` and replaces softmax attention by
    ``o_t = S_t^T (H_t + Lambda)^{-1} q_t`` per head (``mesa_op.py``) on
    L2-normalised queries and keys, followed by a per-head RMSNorm.
    """

    model_type = "mesa_opt"


__all__ = ["MesaOPTConfig"]
