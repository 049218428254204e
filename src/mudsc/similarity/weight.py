"""Weight similarity: how alike the units' weight vectors are (docs/ALGORITHM.md section 3).

Returns an (N*n) x (N*n) float64 matrix, model 0's units first.  It re-expresses
neighbour axes with ``mudsc.apply.transform_tensor``, the transform the final merge uses,
so weights are compared in the basis they will be merged in (Git Re-Basin's trick with
the final-merge rule, for alignment and zip alike).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mudsc.apply import check_matches, transform_tensor
from mudsc.cache import BoundedCache, budget_for
from mudsc.errors import ConfigError, SpecError
from mudsc.solvers.match import Match
from mudsc.spaces.spec import Member, MergeSpec, Space
from mudsc.stats import model_gram, pearson

WeightKind = Literal["correlation", "inner"]


def _members_by_tensor(space: Space) -> dict[str, list[Member]]:
    """A space's non-ignored members grouped by tensor, in spec order."""
    groups: dict[str, list[Member]] = {}
    for m in space.producers + space.consumers:
        groups.setdefault(m.tensor, []).append(m)
    return groups


@dataclass(frozen=True)
class _Part:
    """One tensor's share of a space's unit vectors, as centred moments that add up
    across tensors (Chan's parallel formula), so that a tensor is recomputed only when
    the matches of its other axes change."""

    gram: Tensor  # (N*n, N*n) float64: centred (correlation) or raw (inner) products
    mean: Tensor  # (N*n,) float64 row means over this tensor's columns
    width: int


class WeightSimilarity:
    """S_w of every space of one merge problem: row-wise Pearson correlation of the units'
    weight vectors (all non-ignored members, neighbour axes in the merged basis), or raw
    inner products (``kind="inner"``, Git Re-Basin's objective).  Dead units are 0.

    Called with ``versions`` (a counter per space that changes whenever its match
    changes), it keeps every tensor's share and recomputes only the tensors whose other
    spaces' versions moved: exact, and most of a weight sweep's work near convergence.
    """

    def __init__(
        self,
        spec: MergeSpec,
        states: Sequence[Mapping[str, Tensor]],
        kind: WeightKind = "correlation",
    ) -> None:
        if kind not in ("correlation", "inner"):
            raise ConfigError(
                f"unknown weight similarity kind {kind!r}; use 'correlation' or 'inner'"
            )
        if not states:
            raise ConfigError("weight similarity needs at least one model state")
        self.spec, self.states, self.kind = spec, states, kind
        self.uses = spec.tensor_uses()
        self.spaces = {s.name: s for s in spec.mergeable}
        self._parts: BoundedCache[_Part] = BoundedCache(budget_for(states))

    def __call__(
        self,
        space_name: str,
        matches: Mapping[str, Match],
        versions: Mapping[str, int] | None = None,
    ) -> Tensor:
        space = self.spec.space(space_name)
        if space.fixed:
            raise SpecError(f"space {space_name!r} is fixed; it has no weight similarity")
        groups = _members_by_tensor(space)
        if not groups:
            raise SpecError(f"space {space_name!r} has no producer or consumer to compare")
        check_matches(self.spec, matches, len(self.states))
        parts = []
        for tensor, members in groups.items():
            if versions is None:
                parts.append(self._part(space, tensor, members, matches))
                continue
            key = tuple(
                (u.space, versions[u.space] if u.space in matches else None)
                for u in self.uses[tensor]
                if u.space != space_name
            )
            part = self._parts.get((space_name, tensor), key)
            if part is None:
                part = self._part(space, tensor, members, matches)
                self._parts.put((space_name, tensor), key, part, part.gram.nbytes)
            parts.append(part)
        return self._combine(parts)

    def _part(
        self, space: Space, tensor: str, members: Sequence[Member], matches: Mapping[str, Match]
    ) -> _Part:
        n = space.size
        ts = self._transformed(space, tensor, matches)
        axes = [m.axis % ts[0].dim() for m in members]
        width = sum(
            ts[0].narrow(a, m.start, n * m.inner).numel() // n
            for a, m in zip(axes, members, strict=True)
        )
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in ts])
        x = torch.empty(len(ts) * n, width, dtype=dtype, device=ts[0].device)
        for i, t in enumerate(ts):  # one copy per member slice, as concatenation made
            slices = [t.narrow(a, m.start, n * m.inner) for a, m in zip(axes, members, strict=True)]
            _copy_units(x[i * n : (i + 1) * n], slices, axes)
        if self.kind == "inner":
            return _Part(self._gram(x), x.new_zeros(0), x.shape[1])
        mean = x.mean(dim=1)
        x -= mean[:, None]  # x is this part's own buffer: centre it in place
        return _Part(self._gram(x), mean.to(torch.float64), x.shape[1])

    def _transformed(self, space: Space, tensor: str, matches: Mapping[str, Match]) -> list[Tensor]:
        """Every model's copy of ``tensor`` with its other spaces' axes in the merged basis."""
        ts = []
        for i, state in enumerate(self.states):
            if tensor not in state:
                raise SpecError(
                    f"space {space.name!r}: model {i} has no tensor {tensor!r}; the spec was "
                    "made for another architecture"
                )
            t = state[tensor]
            t = t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)
            uses = self.uses[tensor]
            ts.append(transform_tensor(tensor, t, uses, i, matches, self.spaces, space.name, False))
        return ts

    def _gram(self, x: Tensor) -> Tensor:
        return model_gram(x.T, len(self.states)).to(torch.float64)

    def _combine(self, parts: Sequence[_Part]) -> Tensor:
        # Chan's formula for k parts at once about the common mean, not k - 1 pairwise
        # ``mudsc.moments.combine`` steps: those round differently in the last bits, which
        # is enough to move a zip's pick between near-equal pairs (merges must not change).
        gram = parts[0].gram.clone()
        for p in parts[1:]:
            gram += p.gram
        if self.kind == "inner":
            return gram
        width = sum(p.width for p in parts)
        mean = sum(p.mean * (p.width / width) for p in parts)
        for p in parts if len(parts) > 1 else ():
            shift = p.mean - mean
            gram += p.width * torch.outer(shift, shift)
        return pearson(gram / width, mean, torch.finfo(torch.float64).tiny)


def _copy_units(rows: Tensor, slices: Sequence[Tensor], axes: Sequence[int]) -> None:
    """Write each member's slice, its unit axis first and the rest flattened, into its
    columns of ``rows``: one copy per slice, no intermediate reshape or concatenation."""
    start = 0
    for piece, axis in zip(slices, axes, strict=True):
        moved = piece.movedim(axis, 0)
        width = moved.numel() // rows.shape[0]
        rows[:, start : start + width].view(moved.shape).copy_(moved)
        start += width


def weight_similarity(
    spec: MergeSpec,
    space_name: str,
    states: Sequence[Mapping[str, Tensor]],
    matches: Mapping[str, Match],
    kind: WeightKind = "correlation",
) -> Tensor:
    """S_w of one space (see ``WeightSimilarity``), computed from scratch."""
    return WeightSimilarity(spec, states, kind)(space_name, matches)
