"""Training / evaluation target masks; defined once next to the TinT model (uploadable as remote code)."""

from ..models.tint.sequence_masks import (
    TargetMasks,
    build_target_masks,
    default_position_ids,
    gradient_span,
    next_token_nll,
)

__all__ = ["TargetMasks", "build_target_masks", "default_position_ids", "gradient_span", "next_token_nll"]
