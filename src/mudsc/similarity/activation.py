"""Activation similarity: Pearson correlation of the units' features (docs/ALGORITHM.md 3.1)."""

from __future__ import annotations

from torch import Tensor

from mudsc.stats import SpaceMoments


def activation_similarity(moments: SpaceMoments, eps: float = 1e-7) -> Tensor:
    """Pearson correlation of the stacked features; dead units are 0, never NaN."""
    return moments.correlation(eps)
