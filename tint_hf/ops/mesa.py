"""The mesa-layer op: o_t = S_t^T (H_t + Lambda)^{-1} q_t per head (see :mod:`tint_hf.models.mesa_opt.mesa_layer`)."""

from ..models.mesa_opt.mesa_layer import (
    SOLVERS,
    MesaState,
    chunk_mesa,
    conjugate_gradient,
    fla_available,
    fla_chunk_mesa,
    mesa_step,
    recurrent_mesa,
    state_dtype,
)

__all__ = [
    "SOLVERS", "MesaState", "chunk_mesa", "conjugate_gradient", "fla_available", "fla_chunk_mesa", "mesa_step",
    "recurrent_mesa", "state_dtype",
]
