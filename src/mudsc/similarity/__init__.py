"""Similarity matrices over the stacked units of all models (docs/ALGORITHM.md section 3).

Every similarity is an (N*n) x (N*n) float64 matrix, model 0's units first.  The pipeline
finds them by name in :data:`SIMILARITIES` (see README.md to add one).
"""

from __future__ import annotations

from mudsc.similarity.activation import activation_similarity, dead_units, with_dead_ties
from mudsc.similarity.dual import dual_similarity
from mudsc.similarity.registry import (
    ALPHA,
    SIMILARITIES,
    Similarity,
    WeightOf,
    with_weight_kind,
)
from mudsc.similarity.weight import WeightKind, WeightSimilarity, weight_similarity

__all__ = [
    "ALPHA",
    "SIMILARITIES",
    "Similarity",
    "WeightKind",
    "WeightOf",
    "WeightSimilarity",
    "activation_similarity",
    "dead_units",
    "dual_similarity",
    "weight_similarity",
    "with_dead_ties",
    "with_weight_kind",
]
