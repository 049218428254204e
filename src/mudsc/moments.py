"""Merging two sets of centred moments (Chan et al.'s parallel formula), in one place.

Statistics, weight similarities and REPAIR all keep (count, mean, M2) of their data in
pieces (batches, ranks, tensors) and combine them exactly; M2 is the sum of squared
deviations about the mean: a vector for per-unit variances, a matrix for covariances.
"""

from __future__ import annotations

from torch import Tensor


def combine(
    count_a: float, mean_a: Tensor, m2_a: Tensor, count_b: float, mean_b: Tensor, m2_b: Tensor
) -> tuple[float, Tensor, Tensor]:
    """(count, mean, M2) of the union of two observation sets.

    ``M2`` may be per unit (shape (n,)) or a full matrix (shape (n, n)); the correction
    term is the matching outer product of the mean difference.
    """
    total = count_a + count_b
    if total == 0:
        return 0, mean_a, m2_a
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / total)
    weight = count_a * count_b / total
    correction = delta * delta if m2_a.dim() == 1 else delta[:, None] * delta[None, :]
    return total, mean, m2_a + m2_b + correction * weight
