"""Activation similarity: Pearson correlation of the units' features (docs/ALGORITHM.md 3.1)."""

from __future__ import annotations

import torch
from torch import Tensor

from mudsc.stats import SpaceMoments


def activation_similarity(moments: SpaceMoments, eps: float = 1e-7) -> Tensor:
    """Pearson correlation of the stacked features; dead units are 0, never NaN."""
    return moments.correlation(eps)


def dead_units(act: Tensor) -> Tensor:
    """Units constant on the calibration data: ``pearson`` gives them a 0 diagonal (a live
    unit correlates 1 with itself)."""
    return act.diagonal() == 0


def with_dead_ties(act: Tensor, weight: Tensor) -> Tensor:
    """The activation similarity with its dead-by-dead entries taken from ``weight``.

    Dead units correlate 0 with everything, so an activation-only solver pairs them at
    random.  Their weights still tell them apart: the dead-by-dead block (only it; live
    units keep exactly their activation similarity) is filled with the weight similarity.
    """
    dead = dead_units(act)
    block = dead[:, None] & dead[None, :]
    return torch.where(block, weight.to(act), act)
