"""The checks and helpers every solver shares, so that all of them accept and reject
exactly the same inputs and build their ``Match`` the same way: merge and unmerge matrices
are float64, on the similarity's device.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mudsc.errors import DataError, SpecError
from mudsc.solvers.match import Match, check_positive, match_from_unmerge


def check_similarity(similarity: torch.Tensor, n_models: int) -> int:
    """Validate an (N*n) x (N*n) similarity matrix and return n, the units per model."""
    check_positive(n_models, "n_models")
    if not isinstance(similarity, torch.Tensor):
        raise SpecError(
            f"similarity must be a torch.Tensor, got {type(similarity).__name__}; "
            "convert it with torch.as_tensor."
        )
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise SpecError(
            f"similarity must be a square matrix over the stacked units of all models, "
            f"got shape {tuple(similarity.shape)}."
        )
    if not similarity.is_floating_point():
        raise SpecError(
            f"similarity must be a floating-point tensor, got {similarity.dtype}; "
            "convert it with .double()."
        )
    size = similarity.shape[0]
    if size == 0 or size % n_models:
        raise SpecError(
            f"similarity has {size} rows, which is not {n_models} models times a positive "
            "number of units; check n_models and that every model's units are stacked."
        )
    if not bool(torch.isfinite(similarity).all()):
        raise DataError(
            "similarity contains NaN or infinite entries; check the statistics it was "
            "computed from (dead units must get similarity 0, not NaN)."
        )
    return size // n_models


def check_group_count(groups: int) -> int:
    """Validate a block count G on its own (a positive integer) and return it."""
    return check_positive(groups, "groups")


def check_groups(n: int, groups: int) -> int:
    """Validate a block count G for a space of n units and return the block size g."""
    if n % check_group_count(groups):
        raise SpecError(
            f"a space of {n} units cannot be split into {groups} equal blocks; "
            "groups must divide the space size."
        )
    return n // groups


def cross_block(similarity: torch.Tensor, n: int, i: int) -> np.ndarray:
    """S[model 0, model i] as a CPU float64 array (what the assignment solver needs)."""
    block = similarity.detach()[:n, i * n : (i + 1) * n]
    return block.to(device="cpu", dtype=torch.float64).numpy()


def assign(cost: np.ndarray) -> np.ndarray:
    """Columns of the square assignment maximising the sum: row r is matched to col[r]."""
    rows, cols = linear_sum_assignment(cost, maximize=True)
    if not np.array_equal(rows, np.arange(cost.shape[0])):
        cols = cols[np.argsort(rows)]
    return cols


def match_from_labels(labels: torch.Tensor, n: int, n_models: int, value: float) -> Match:
    """Match from the merged unit (0..n-1) of every source unit; device of ``labels``."""
    unmerge = torch.nn.functional.one_hot(labels, n).to(torch.float64)
    return match_from_unmerge(unmerge, n_models, value)


def mean_of(picked: list[np.ndarray]) -> float:
    """Mean over all picked similarities (0 when nothing was picked, e.g. one model)."""
    values = np.concatenate(picked) if picked else np.zeros(0)
    return float(values.mean()) if values.size else 0.0
