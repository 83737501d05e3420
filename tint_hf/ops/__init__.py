"""Standalone sequence-mixing ops of tint_hf (the implementations live in the self-contained model folders)."""

from .mesa import SOLVERS, chunk_mesa, conjugate_gradient, fla_available, fla_chunk_mesa, mesa_step, recurrent_mesa

__all__ = [
    "SOLVERS", "chunk_mesa", "conjugate_gradient", "fla_available", "fla_chunk_mesa", "mesa_step", "recurrent_mesa",
]
