"""The similarities found by name: one record per similarity, saying what it needs.

A similarity turns what the pipeline has for one space (the activation similarity, if
statistics were collected, and a way to ask for the weight similarity of a kind under the
current matches) into the (N*n) x (N*n) matrix the solver reads.  Its record declares
what it needs, so the pipeline asks the similarity and never a method's name: activation
statistics (``activations``), weight similarities and therefore weight sweeps
(``weights``, the kind), and its parameters (``alpha`` for a blend).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from torch import Tensor

from mudsc.registry import Param, Registry
from mudsc.similarity.dual import dual_similarity
from mudsc.similarity.weight import WeightKind

WeightOf = Callable[[WeightKind], Tensor]
"""The weight similarity of one space under the current matches, of the given kind."""


class Compute(Protocol):
    def __call__(self, act: Tensor | None, weight: WeightOf, alpha: float) -> Tensor:
        """``act``: the space's activation similarity (None when it has no tap)."""
        ...


@dataclass(frozen=True)
class Similarity:
    """A named similarity: how to compute it and what it needs."""

    name: str
    description: str
    compute: Compute
    activations: bool = False
    weights: WeightKind | None = None
    params: tuple[Param, ...] = ()

    @property
    def uses_alpha(self) -> bool:
        """Whether the weight share alpha changes the similarity (and can be searched)."""
        return any(p.name == "alpha" for p in self.params)


def with_weight_kind(similarity: Similarity, kind: WeightKind) -> Similarity:
    """``similarity`` reading the weight similarity of ``kind`` wherever it reads one (e.g.
    Git Re-Basin on weight correlations, the authors' ``useperm``); a similarity without
    weight sweeps is returned unchanged."""
    if similarity.weights is None or similarity.weights == kind:
        return similarity
    compute = similarity.compute

    def swapped(act: Tensor | None, weight: WeightOf, alpha: float) -> Tensor:
        return compute(act, lambda _own: weight(kind), alpha)

    return replace(similarity, compute=swapped, weights=kind)


ALPHA = Param(
    "alpha", 0.5, "weight-space share of a dual similarity, in [0, 1], or 'auto' to search"
)


def activation(act: Tensor | None, weight: WeightOf, alpha: float) -> Tensor:
    """Feature correlation; a space without taps falls back to weight correlation."""
    return weight("correlation") if act is None else act


def weight_correlation(act: Tensor | None, weight: WeightOf, alpha: float) -> Tensor:
    return weight("correlation")


def weight_inner(act: Tensor | None, weight: WeightOf, alpha: float) -> Tensor:
    return weight("inner")


def dual(act: Tensor | None, weight: WeightOf, alpha: float) -> Tensor:
    """alpha * S_w + (1 - alpha) * S_act; alpha = 0 is exactly S_act (no weights needed),
    a space without taps uses S_w alone."""
    if act is None:
        return weight("correlation")
    if alpha == 0.0:
        return act
    return dual_similarity(weight("correlation"), act, alpha)


SIMILARITIES: Registry[Similarity] = Registry(
    "similarity",
    "similarities",
    [
        Similarity("activation", "Pearson correlation of the units' features", activation,
                   activations=True),
        Similarity("weight", "Pearson correlation of the units' weight vectors",
                   weight_correlation, weights="correlation"),
        Similarity("weight-inner", "raw inner products of the units' weight vectors "
                   "(Git Re-Basin)", weight_inner, weights="inner"),
        Similarity("dual", "alpha * weight + (1 - alpha) * activation (MuDSC)", dual,
                   activations=True, weights="correlation", params=(ALPHA,)),
    ],
)  # fmt: skip
