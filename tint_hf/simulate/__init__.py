"""Reference (oracle) implementations of one step of in-context SGD on an ordinary HF causal LM.

* :func:`exact_step`: true dynamic evaluation with torch autograd, for any HF causal LM.
* :func:`tint_step`: the approximate step that TinT simulates (:class:`Approximations`), for OPT, GPT-2 and Llama-family
  models, run on the HF model's own modules; nothing here is imported from ``tint_hf.models.tint`` (the TinT
  implementation it checks).
"""

from .exact import exact_step, forward_with_params, select_parameters, sgd_update
from .families import UnsupportedModelError
from .masks import TargetMasks, build_target_masks, default_position_ids, next_token_nll
from .outputs import SimulationOutput
from .tint import Approximations, tint_step, trainable_names

__all__ = [
    "Approximations", "SimulationOutput", "TargetMasks", "build_target_masks", "default_position_ids",
    "exact_step", "forward_with_params", "next_token_nll", "select_parameters", "sgd_update", "tint_step",
    "trainable_names", "UnsupportedModelError",
]
