"""The solvers found by name: one protocol, one record per solver, one registry.

Every solver is called the same way, ``solve(similarity, n_models, groups=1,
block_order=None, **params)``; a solver that has a block-respecting version dispatches to
it when ``groups > 1``.  ``params`` are the solver's declared parameters (e.g. ZipIt!'s
a and b), passed by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from mudsc.registry import Param, Registry
from mudsc.solvers.align import align
from mudsc.solvers.checks import check_group_count, check_similarity
from mudsc.solvers.groups import group_align, group_zip
from mudsc.solvers.match import Match, identity_match
from mudsc.solvers.zip import zip_match


class SolveFn(Protocol):
    def __call__(
        self,
        similarity: Tensor,
        n_models: int,
        *,
        groups: int = 1,
        block_order: Tensor | None = None,
        **params: float,
    ) -> Match: ...


@dataclass(frozen=True)
class Solver:
    """A named solver: its function, declared parameters and what it needs.

    ``needs_similarity`` is False for a solver whose answer does not depend on the
    similarity (identity): a method using it computes no similarity at all.
    """

    name: str
    description: str
    solve: SolveFn | Callable[..., Match]
    params: tuple[Param, ...] = ()
    needs_similarity: bool = True


ZIP_A = Param(
    "zip_a",
    0.5,
    "ZipIt!'s a: re-merge damping of a merged cluster's similarity (<= 0: no within-model "
    "merges; at most 1)",
)
ZIP_B = Param("zip_b", 1.0, "ZipIt!'s b: share of the within-model merge budget, in [0, 1]")


def solve_identity(
    similarity: Tensor, n_models: int, *, groups: int = 1, block_order: Tensor | None = None
) -> Match:
    """Unit k of every model goes to merged unit k, whatever the similarity says."""
    return identity_match(check_similarity(similarity, n_models), n_models)


def solve_align(
    similarity: Tensor, n_models: int, *, groups: int = 1, block_order: Tensor | None = None
) -> Match:
    if check_group_count(groups) > 1:
        return group_align(similarity, n_models, groups, block_order=block_order)
    return align(similarity, n_models)


def solve_zip(
    similarity: Tensor,
    n_models: int,
    *,
    groups: int = 1,
    block_order: Tensor | None = None,
    zip_a: float = ZIP_A.default,
    zip_b: float = ZIP_B.default,
) -> Match:
    if check_group_count(groups) > 1:
        return group_zip(similarity, n_models, groups, zip_a, zip_b, block_order=block_order)
    return zip_match(similarity, n_models, zip_a, zip_b)


SOLVERS: Registry[Solver] = Registry(
    "solver",
    "solvers",
    [
        Solver("identity", "every model's unit k to merged unit k", solve_identity,
               needs_similarity=False),
        Solver("align", "one-to-one linear assignment to model 0 (block-wise when grouped)",
               solve_align),
        Solver("zip", "ZipIt!'s greedy merge of the most similar units (block-wise when "
               "grouped)", solve_zip, (ZIP_A, ZIP_B)),
    ],
)  # fmt: skip
