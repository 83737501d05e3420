"""The sequence-mixing ops of tint_hf, for use without a model.

The mesa op lives in the mesa model folder (``tint_hf/models/mesa/mesa_op.py``, so that a saved checkpoint carries it
as remote code) and is re-exported here: :func:`chunk_mesa` (chunkwise-parallel training form with an implicit
backward), :func:`recurrent_mesa`, :func:`mesa_step` (one decoding step), :func:`fla_chunk_mesa`
(flash-linear-attention's kernels when installed), :func:`conjugate_gradient`, and :func:`naive_mesa` (the same
maths token by token with dense solves, the readable reference).
"""

from ..models.mesa.mesa_naive import naive_mesa
from ..models.mesa.mesa_op import (
    SOLVERS,
    chunk_mesa,
    conjugate_gradient,
    fla_available,
    fla_chunk_mesa,
    mesa_step,
    recurrent_mesa,
)

__all__ = [
    "SOLVERS", "chunk_mesa", "conjugate_gradient", "fla_available", "fla_chunk_mesa", "mesa_step", "naive_mesa",
    "recurrent_mesa",
]
