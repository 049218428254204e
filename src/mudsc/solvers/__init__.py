"""Solvers: from a similarity matrix over the stacked units of N models to a ``Match``.

Every solver is a pure function of its inputs (never modifies them) and returns merge and
unmerge matrices of shape (N*n, n) in float64 on the similarity's device.  The pipeline
finds them by name in :data:`SOLVERS` (see README.md to add one).
"""

from __future__ import annotations

from mudsc.registry import Param, Registry
from mudsc.solvers.align import align
from mudsc.solvers.catalogue import SOLVERS, Solver
from mudsc.solvers.groups import block_scores, group_align, group_zip, pair_blocks
from mudsc.solvers.match import Match, identity_match, match_from_unmerge
from mudsc.solvers.zip import zip_match


def identity(n: int, n_models: int) -> Match:
    """U = [I; I; ...]: every model's unit k goes to merged unit k (weight averaging)."""
    return identity_match(n, n_models)


__all__ = [
    "SOLVERS",
    "Match",
    "Param",
    "Registry",
    "Solver",
    "align",
    "block_scores",
    "group_align",
    "group_zip",
    "identity",
    "identity_match",
    "match_from_unmerge",
    "pair_blocks",
    "zip_match",
]
