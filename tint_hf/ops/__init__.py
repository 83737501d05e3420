"""Sequence-mixing ops of tint_hf, independent of any model.

* :mod:`.mesa`: the mesa-layer op in its fast forms (one decoding step, the recurrent form, the chunkwise-parallel
  training form with an implicit backward, flash-linear-attention's kernels when installed). The MesaOPT model
  folder reaches this file through its ``mesa_op.py`` link, so a saved checkpoint carries it as remote code.
* :mod:`.mesa_naive`: the same maths token by token with dense solves, the readable reference.
"""

from .mesa import SOLVERS, chunk_mesa, conjugate_gradient, fla_available, fla_chunk_mesa, mesa_step, recurrent_mesa
from .mesa_naive import naive_mesa

__all__ = [
    "SOLVERS", "chunk_mesa", "conjugate_gradient", "fla_available", "fla_chunk_mesa", "mesa_step", "naive_mesa",
    "recurrent_mesa",
]
