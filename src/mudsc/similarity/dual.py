"""MuDSC's dual-space similarity: a blend of weight and activation similarity."""

from __future__ import annotations

import torch
from torch import Tensor

from mudsc.errors import ConfigError, SpecError


def dual_similarity(s_weight: Tensor, s_act: Tensor, alpha: float) -> Tensor:
    """MuDSC's dual-space similarity alpha * S_w + (1 - alpha) * S_act (float64)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"alpha (the weight-space share) must be in [0, 1], got {alpha}")
    if s_weight.shape != s_act.shape:
        raise SpecError(
            f"weight and activation similarities differ in shape: {tuple(s_weight.shape)} "
            f"vs {tuple(s_act.shape)}"
        )
    s_act = s_act.to(device=s_weight.device, dtype=torch.float64)
    return alpha * s_weight.to(torch.float64) + (1.0 - alpha) * s_act
