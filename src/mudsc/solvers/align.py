"""Alignment: one-to-one matching of every model's units to model 0's (docs/ALGORITHM.md 4.1)."""

from __future__ import annotations

import numpy as np
import torch

from mudsc.solvers.checks import assign, check_similarity, cross_block, match_from_labels, mean_of
from mudsc.solvers.match import Match


def align(similarity: torch.Tensor, n_models: int) -> Match:
    """Match every model to model 0 by linear assignment on the cross blocks.

    Model 0's unit j is merged unit j; model i's unit sigma_i(j) joins it, sigma_i
    maximising sum_j S[j, i*n + sigma_i(j)].  For N > 2 each model is aligned to model 0
    alone: with only S (no features or weights) the MergeMany refinement "align model i to
    the mean of the others" cannot be formed, since the mean of aligned units is not a
    row of S.  ``value`` is the mean matched similarity over all models' pairs.
    """
    n = check_similarity(similarity, n_models)
    labels = np.empty(n_models * n, dtype=np.int64)
    labels[:n] = np.arange(n)
    picked = []
    for i in range(1, n_models):
        cross = cross_block(similarity, n, i)
        cols = assign(cross)
        labels[i * n + cols] = np.arange(n)
        picked.append(cross[np.arange(n), cols])
    labels_t = torch.as_tensor(labels, device=similarity.device)
    return match_from_labels(labels_t, n, n_models, mean_of(picked))
