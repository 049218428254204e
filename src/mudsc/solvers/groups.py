"""Block-respecting solvers for grouped spaces: heads, GroupNorm groups, grouped convs.

A space of n units in G blocks of g units may only be permuted within and between whole
blocks.  Blocks are first paired across models (a G x G assignment on block scores), then
units are matched inside each block pair, so a block is never split.  Block pairing is
exposed on its own (``block_scores`` + ``pair_blocks``) because spaces tied in block order
(an attention layer's q/k and v) must share one pairing: the caller sums their scores,
pairs once, and passes the order to each space's solver.  With G = 1 every function
reduces exactly to its ungrouped solver.
"""

from __future__ import annotations

import numpy as np
import torch

from mudsc.errors import DataError, SpecError
from mudsc.solvers.checks import (
    assign,
    check_groups,
    check_similarity,
    cross_block,
    match_from_labels,
    mean_of,
)
from mudsc.solvers.match import Match
from mudsc.solvers.zip import check_zip_params, zip_budget, zip_clusters


def block_scores(similarity: torch.Tensor, n_models: int, groups: int) -> torch.Tensor:
    """(N, G, G) float64: scores[i, a, b] = mean matched similarity of the optimal g x g
    assignment between model 0's block a and model i's block b.

    scores[0] (model 0 with itself) is the identity matrix, so that summing the scores of
    tied spaces and pairing them stays well defined.  Costs (N-1) G^2 assignments of
    size g (none when g = 1).
    """
    n = check_similarity(similarity, n_models)
    g = check_groups(n, groups)
    scores = np.zeros((n_models, groups, groups))
    scores[0] = np.eye(groups)
    for i in range(1, n_models):
        blocks = cross_block(similarity, n, i).reshape(groups, g, groups, g).transpose(0, 2, 1, 3)
        if g == 1:
            scores[i] = blocks[:, :, 0, 0]
            continue
        for a in range(groups):
            for b in range(groups):
                cols = assign(blocks[a, b])
                scores[i, a, b] = blocks[a, b][np.arange(g), cols].mean()
    return torch.as_tensor(scores, device=similarity.device)


def pair_blocks(scores: torch.Tensor) -> torch.Tensor:
    """(N, G) long: order[i, a] is the block of model i paired with model 0's block a.

    One G x G assignment per model maximising the summed block scores; order[0] is the
    identity.  Pass the *sum* of the block scores of all block-tied spaces.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
        raise SpecError("block scores must be an (N, G, G) tensor, as from block_scores.")
    n_models, rows, cols = scores.shape
    if n_models < 1 or rows != cols or rows < 1:
        raise SpecError(
            f"block scores must be (N, G, G) with square G x G slices, "
            f"got shape {tuple(scores.shape)}."
        )
    if not bool(torch.isfinite(scores).all()):
        raise DataError(
            "block scores contain NaN or infinite entries; check the similarity they were "
            "computed from."
        )
    host = scores.detach().to(device="cpu", dtype=torch.float64).numpy()
    order = np.empty((n_models, rows), dtype=np.int64)
    order[0] = np.arange(rows)
    for i in range(1, n_models):
        order[i] = assign(host[i])
    return torch.as_tensor(order, device=scores.device)


def _block_order(
    similarity: torch.Tensor, n_models: int, groups: int, block_order: torch.Tensor | None
) -> np.ndarray:
    """The given block order, validated, or the one computed from this similarity."""
    if block_order is None:
        return pair_blocks(block_scores(similarity, n_models, groups)).cpu().numpy()
    order = torch.as_tensor(block_order).detach().cpu()
    if order.shape != (n_models, groups) or order.is_floating_point():
        raise SpecError(
            f"block_order must be an integer tensor of shape ({n_models}, {groups}), "
            f"got {tuple(order.shape)} {order.dtype}; build it with pair_blocks."
        )
    order = order.numpy().astype(np.int64)
    expected = np.arange(groups)
    for i, row in enumerate(order):
        if not np.array_equal(np.sort(row), expected):
            raise SpecError(
                f"block_order row {i} is not a permutation of 0..{groups - 1}: {row.tolist()}."
            )
    return order


def group_align(
    similarity: torch.Tensor,
    n_models: int,
    groups: int,
    block_order: torch.Tensor | None = None,
) -> Match:
    """Alignment that keeps blocks whole.

    Merged block t holds block ``order[i, t]`` of every model i (model 0's block t when
    the order comes from ``pair_blocks``); inside it, model 0's k-th unit is merged unit
    t*g + k and every other model's units are matched to it by a g x g assignment.
    """
    n = check_similarity(similarity, n_models)
    g = check_groups(n, groups)
    order = _block_order(similarity, n_models, groups, block_order)
    labels = np.empty(n_models * n, dtype=np.int64)
    local = np.arange(g)
    for t in range(groups):
        labels[order[0, t] * g + local] = t * g + local
    picked = []
    for i in range(1, n_models):
        cross = cross_block(similarity, n, i)
        for t in range(groups):
            rows = order[0, t] * g + local
            cols = order[i, t] * g + local
            sub = cross[np.ix_(rows, cols)]
            matched = assign(sub)
            labels[i * n + cols[matched]] = t * g + local
            picked.append(sub[local, matched])
    labels_t = torch.as_tensor(labels, device=similarity.device)
    return match_from_labels(labels_t, n, n_models, mean_of(picked))


def group_zip(
    similarity: torch.Tensor,
    n_models: int,
    groups: int,
    a: float = 0.5,
    b: float = 1.0,
    block_order: torch.Tensor | None = None,
) -> Match:
    """Zip that keeps blocks whole.

    Merged block t (columns t*g .. (t+1)*g - 1) is zipped from the N paired blocks
    ``order[i, t]`` alone: N*g units into g clusters, with a per-block within-model budget
    floor(floor((N*g - g)/N) * b).  Units of other blocks never meet.
    """
    n = check_similarity(similarity, n_models)
    g = check_groups(n, groups)
    check_zip_params(a, b, n_models)
    order = torch.as_tensor(_block_order(similarity, n_models, groups, block_order))
    device = similarity.device
    local = torch.arange(g)
    offsets = torch.arange(n_models)[:, None] * n
    owner = torch.arange(n_models, device=device).repeat_interleave(g)
    budget = zip_budget(g, n_models, b)
    labels = torch.empty(n_models * n, dtype=torch.long, device=device)
    picked: list[float] = []
    for t in range(groups):
        units = (offsets + order[:, t, None] * g + local).reshape(-1).to(device)
        sub = similarity.index_select(0, units).index_select(1, units)
        block_labels, block_picked = zip_clusters(sub, owner, n_models, g, a, budget)
        labels[units] = t * g + block_labels
        picked.extend(block_picked)
    value = sum(picked) / len(picked) if picked else 0.0
    return match_from_labels(labels, n, n_models, value)
