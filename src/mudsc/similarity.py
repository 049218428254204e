"""Similarity matrices over the stacked units of all models (ALGORITHM.md section 3).

Every function returns an (N*n) x (N*n) float64 matrix, model 0's units first.  The
weight similarity re-expresses neighbour axes with ``mudsc.apply.transform_tensor``, the
transform the final merge uses, so weights are compared in the basis they will be merged
in (Git Re-Basin's trick with the final-merge rule, for alignment and zip alike).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from mudsc.apply import check_matches, transform_tensor
from mudsc.errors import MudscError
from mudsc.solvers.match import Match
from mudsc.spaces.spec import MergeSpec
from mudsc.stats import SpaceMoments, pearson

WeightKind = Literal["correlation", "inner"]


def activation_similarity(moments: SpaceMoments, eps: float = 1e-7) -> Tensor:
    """Pearson correlation of the stacked features; dead units are 0, never NaN."""
    return moments.correlation(eps)


def unit_vectors(
    spec: MergeSpec,
    space_name: str,
    states: Sequence[Mapping[str, Tensor]],
    matches: Mapping[str, Match],
) -> Tensor:
    """(N*n, D) float64: each unit's weights (all non-ignored members, concatenated).

    Axes of other matched spaces are first re-expressed in the merged basis; the space's
    own axes stay in each model's basis; ignored members (running statistics) are left out.
    """
    space = spec.space(space_name)
    if space.fixed:
        raise MudscError(f"space {space_name!r} is fixed; it has no weight similarity")
    members = space.producers + space.consumers
    if not members:
        raise MudscError(f"space {space_name!r} has no producer or consumer to compare")
    if not states:
        raise MudscError("weight similarity needs at least one model state")
    check_matches(spec, matches, len(states))
    uses = spec.tensor_uses()
    spaces = {s.name: s for s in spec.mergeable}
    n = space.size
    rows = []
    for i, state in enumerate(states):
        cache: dict[str, Tensor] = {}
        parts = []
        for m in members:
            if m.tensor not in state:
                raise MudscError(
                    f"space {space_name!r}: model {i} has no tensor {m.tensor!r}; the spec was "
                    "made for another architecture"
                )
            if m.tensor not in cache:
                t = state[m.tensor]
                t = t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)
                cache[m.tensor] = transform_tensor(
                    m.tensor, t, uses[m.tensor], i, matches, spaces, space_name, compress=False
                )
            t = cache[m.tensor]
            axis = m.axis % t.dim()
            x = t.narrow(axis, m.start, n * m.inner).movedim(axis, 0)
            parts.append(x.reshape(n, -1))
        rows.append(torch.cat(parts, dim=1))
    device = rows[0].device
    return torch.cat([r.to(device) for r in rows], dim=0)


def weight_similarity(
    spec: MergeSpec,
    space_name: str,
    states: Sequence[Mapping[str, Tensor]],
    matches: Mapping[str, Match],
    kind: WeightKind = "correlation",
) -> Tensor:
    """S_w of one space: row-wise Pearson correlation of the unit vectors, or raw inner
    products (``kind="inner"``, Git Re-Basin's objective).  Dead (constant) units are 0."""
    if kind not in ("correlation", "inner"):
        raise MudscError(f"unknown weight similarity kind {kind!r}; use 'correlation' or 'inner'")
    x = unit_vectors(spec, space_name, states, matches)
    if kind == "inner":
        return (x @ x.T).to(torch.float64)
    mean = x.mean(dim=1)
    xc = x - mean[:, None]
    cov = (xc @ xc.T / x.shape[1]).to(torch.float64)
    return pearson(cov, mean.to(torch.float64), torch.finfo(torch.float64).tiny)


def dual_similarity(s_weight: Tensor, s_act: Tensor, alpha: float) -> Tensor:
    """MuDSC's dual-space similarity alpha * S_w + (1 - alpha) * S_act (float64)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise MudscError(f"alpha (the weight-space share) must be in [0, 1], got {alpha}")
    if s_weight.shape != s_act.shape:
        raise MudscError(
            f"weight and activation similarities differ in shape: {tuple(s_weight.shape)} "
            f"vs {tuple(s_act.shape)}"
        )
    s_act = s_act.to(device=s_weight.device, dtype=torch.float64)
    return alpha * s_weight.to(torch.float64) + (1.0 - alpha) * s_act
