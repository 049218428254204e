"""Match: what a solver returns for one space, the merge and unmerge matrices."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mudsc.errors import ConfigError, SpecError


def check_positive(value: object, what: str) -> int:
    """``value`` if it is a positive integer (a bool is not), else one line naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}.")
    return value


@dataclass(frozen=True)
class Match:
    """Merge matrices of one space for ``n_models`` models of ``n`` units each.

    ``merge`` (N*n x n): column k holds the weights that average the source units assigned
    to merged unit k (each column sums to 1).  ``unmerge`` (N*n x n): 0/1 membership of
    source unit u in merged unit k.  Rows are the stacked units, model 0 first.
    ``value`` is the mean similarity of the matched pairs (the solver's objective).
    """

    merge: torch.Tensor
    unmerge: torch.Tensor
    value: float
    n_models: int

    def __post_init__(self) -> None:
        check_positive(self.n_models, "n_models")
        shapes = [tuple(getattr(m, "shape", ())) for m in (self.merge, self.unmerge)]
        rows, cols = shapes[0] if len(shapes[0]) == 2 else (0, 0)
        if shapes[0] != shapes[1] or cols < 1 or rows != self.n_models * cols:
            raise SpecError(
                f"a match's merge and unmerge must both be (N*n, n) matrices for "
                f"N={self.n_models} models, got shapes {shapes[0]} and {shapes[1]}"
            )

    @property
    def size(self) -> int:
        return self.merge.shape[0] // self.n_models

    def merge_of(self, i: int) -> torch.Tensor:
        """Model i's block M_i (n x n')."""
        n = self.size
        return self.merge[i * n : (i + 1) * n]

    def unmerge_of(self, i: int) -> torch.Tensor:
        """Model i's block U_i (n x n')."""
        n = self.size
        return self.unmerge[i * n : (i + 1) * n]

    def to(self, device: torch.device | str) -> Match:
        return Match(self.merge.to(device), self.unmerge.to(device), self.value, self.n_models)


def match_from_unmerge(unmerge: torch.Tensor, n_models: int, value: float) -> Match:
    """Build a Match from 0/1 membership: M is U with every column divided by its size."""
    unmerge = unmerge.to(torch.float64)
    sizes = unmerge.sum(dim=0, keepdim=True).clamp_min(1.0)
    return Match(unmerge / sizes, unmerge, float(value), n_models)


def identity_match(n: int, n_models: int, dtype: torch.dtype = torch.float64) -> Match:
    """U = [I; I; ...]: unit k of every model goes to merged unit k (plain averaging)."""
    check_positive(n, "the number of units per space")
    check_positive(n_models, "n_models")
    eye = torch.eye(n, dtype=dtype)
    return match_from_unmerge(torch.cat([eye] * n_models, dim=0), n_models, value=0.0)
