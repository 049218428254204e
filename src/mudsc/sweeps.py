"""The matching engine: the initial solution and the weight sweeps (docs/ALGORITHM.md section 5).

Spaces are solved in *solve groups*: a space alone, or the spaces tied in block order (an
attention layer's q/k and v), which share one block pairing.  The weight sweeps are
coordinate ascent over the solve groups in a seeded random order, keeping the best sweep.
Under the ``"continue"`` rule a sweep starts from where the last one ended; under
``"restart"`` (the authors' rule) a sweep that did not beat the best is undone, so the
next one starts again from the best matching with a new visiting order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mudsc.cache import BoundedCache, budget_for
from mudsc.errors import ConfigError
from mudsc.progress import Progress
from mudsc.similarity import Similarity, WeightKind, WeightSimilarity
from mudsc.solvers import Solver, block_scores, pair_blocks
from mudsc.solvers.match import Match, identity_match
from mudsc.spaces import MergeSpec, Space
from mudsc.timing import StageTimer

SolveGroup = tuple[Space, ...]
"""Spaces solved together: one space, or the spaces tied in block order."""

SWEEP_RULES = ("continue", "restart")
"""Where a sweep starts after one that did not improve: its end, or the best so far."""


@dataclass(frozen=True)
class SweepLimits:
    """When the weight sweeps stop, the seed of their visiting order, and the rule of
    :data:`SWEEP_RULES` that says where a sweep starts after one that did not improve."""

    max_sweeps: int
    patience: int
    tolerance: float
    seed: int
    rule: str = "continue"

    def __post_init__(self) -> None:
        if self.rule not in SWEEP_RULES:
            raise ConfigError(f"unknown sweep rule {self.rule!r}; valid: {', '.join(SWEEP_RULES)}")


def solve_groups(spec: MergeSpec) -> list[SolveGroup]:
    """The mergeable spaces as solve groups: tied spaces together, others alone."""
    ties = spec.tie_groups()
    seen: set[str] = set()
    groups = []
    for space in spec.mergeable:
        if space.name in seen:
            continue
        names = ties.get(space.block_tie, (space.name,)) if space.block_tie else (space.name,)
        groups.append(tuple(spec.space(n) for n in names))
        seen.update(names)
    return groups


def solve_group(
    group: SolveGroup,
    sims: Sequence[Tensor],
    n_models: int,
    solver: Solver,
    params: Mapping[str, float],
) -> list[Match]:
    """Solve one space, or a block-tied set of spaces with one shared block order."""
    order = None
    if len(group) > 1 and solver.needs_similarity:
        scores = sum(
            block_scores(s, n_models, sp.groups) for sp, s in zip(group, sims, strict=True)
        )
        order = pair_blocks(scores)
    return [
        solver.solve(s, n_models, groups=sp.groups, block_order=order, **params)
        for sp, s in zip(group, sims, strict=True)
    ]


def neighbours(spec: MergeSpec) -> dict[str, tuple[str, ...]]:
    """For each space, the other spaces on the axes of its member tensors: the matches its
    weight similarity depends on."""
    on_tensor: dict[str, set[str]] = {}
    for space in spec.mergeable:
        for _, member in space.members():
            on_tensor.setdefault(member.tensor, set()).add(space.name)
    result = {}
    for space in spec.mergeable:
        near: set[str] = set()
        for _, member in space.members():
            near |= on_tensor[member.tensor]
        near.discard(space.name)
        result[space.name] = tuple(sorted(near))
    return result


def visit_order(n_groups: int, gen: torch.Generator) -> list[int]:
    """One sweep's order of solve groups: a fresh permutation from the seeded generator."""
    return torch.randperm(n_groups, generator=gen).tolist()


def sweep_score(matches: Mapping[str, Match]) -> float:
    """What a sweep maximises: the mean value of every space's match."""
    return sum(m.value for m in matches.values()) / max(len(matches), 1)


class SweepEngine:
    """One matching problem: the sources' weights, the spec, the similarity and solver of
    the method, and the activation similarities (when the similarity uses them).  A
    method without a similarity (weight averaging) keeps the identity matches."""

    def __init__(
        self,
        spec: MergeSpec,
        states: Sequence[Mapping[str, Tensor]],
        similarity: Similarity | None,
        solver: Solver,
        params: Mapping[str, float],
        s_act: Mapping[str, Tensor],
        timer: StageTimer,
        progress: Progress | None = None,
    ) -> None:
        self.spec, self.states, self.s_act = spec, states, s_act
        self.similarity, self.solver, self.params = similarity, solver, dict(params)
        self.timer, self.progress = timer, progress
        self.n = len(states)
        self.groups = solve_groups(spec)
        self.neighbours = neighbours(spec)
        self.weight_sims: dict[WeightKind, WeightSimilarity] = {}
        self.stamps = itertools.count()

    def _solve(self, group: SolveGroup, sims: Sequence[Tensor]) -> list[Match]:
        with self.timer.stage("assignment"):
            return solve_group(group, sims, self.n, self.solver, self.params)

    def _weights(self, kind: WeightKind) -> WeightSimilarity:
        if kind not in self.weight_sims:
            self.weight_sims[kind] = WeightSimilarity(self.spec, self.states, kind)
        return self.weight_sims[kind]

    def space_similarity(
        self,
        space: Space,
        matches: Mapping[str, Match],
        alpha: float,
        versions: Mapping[str, int] | None = None,
    ) -> Tensor:
        """The method's similarity of one space under the current matches."""

        def weight(kind: WeightKind) -> Tensor:
            return self._weights(kind)(space.name, matches, versions)

        assert self.similarity is not None, "a method without a similarity is never swept"
        return self.similarity.compute(self.s_act.get(space.name), weight, alpha)

    def initial(self) -> dict[str, Match]:
        """Activation solution where activations are used, identity otherwise."""
        device = next((t.device for t in self.states[0].values()), torch.device("cpu"))
        # on the states' device: a re-solved match (there) is compared with torch.equal
        matches = {s.name: identity_match(s.size, self.n).to(device) for s in self.spec.mergeable}
        if self.similarity is None or not self.similarity.activations:
            return matches
        for group in self.groups:
            sims = [self.space_similarity(sp, matches, 0.0) for sp in group]
            for sp, m in zip(group, self._solve(group, sims), strict=True):
                matches[sp.name] = m
        return matches

    def sweep(
        self, start: Mapping[str, Match], alpha: float, limits: SweepLimits
    ) -> tuple[dict[str, Match], int]:
        """Coordinate ascent over solve groups in a seeded random order; keep the best
        sweep (``limits.rule``: after one that did not improve, go on from its end or
        from the best).  Returns the best matches and the number of sweeps run."""
        matches = dict(start)
        sweeps = 0
        gen = torch.Generator().manual_seed(limits.seed)
        # S(p) depends only on the matches of p's neighbours: recompute it only when one of
        # them changed since it was last computed, and re-solve a group only when one of
        # its similarities changed (exact; near convergence most of both are reused).
        # Version stamps are unique across calls, so caches kept by the engine never go
        # stale; a stamp names one match for good, so a restart that puts back the best
        # matches with their stamps (and the keys their groups were solved for) keeps
        # every cache exact.
        versions = {name: next(self.stamps) for name in matches}
        cached: BoundedCache[Tensor] = BoundedCache(budget_for(self.states))
        solved: dict[int, tuple[tuple[int, ...], ...]] = {}  # group -> keys it was solved for
        current = _State(matches, versions, solved)
        best = _Best(current, limits)

        def similarity(space: Space) -> tuple[tuple[int, ...], Tensor]:
            key = tuple(versions[q] for q in self.neighbours[space.name])
            sim = cached.get(space.name, key)
            if sim is None:
                sim = self.space_similarity(space, matches, alpha, versions)
                cached.put(space.name, key, sim, sim.nbytes)
            return key, sim

        for sweep in range(limits.max_sweeps):
            sweeps = sweep + 1
            for g in visit_order(len(self.groups), gen):
                group = self.groups[g]
                keyed = [similarity(sp) for sp in group]
                key = tuple(k for k, _ in keyed)
                if solved.get(g) == key:
                    continue  # same similarities, same (deterministic) solution
                result = self._solve(group, [s for _, s in keyed])
                solved[g] = key
                for sp, m in zip(group, result, strict=True):
                    if not torch.equal(m.unmerge, matches[sp.name].unmerge):
                        versions[sp.name] = next(self.stamps)
                    matches[sp.name] = _shared(m, matches[sp.name])
            if self.progress:
                self.progress("weight sweeps", sweeps, limits.max_sweeps)
            if best.stalled(current):
                break
        return dict(best.state.matches), sweeps


def _shared(new: Match, old: Match) -> Match:
    """``new``, holding ``old``'s tensors when they are equal: the start, the best and the
    current sweep then share one copy of every unchanged (N*n, n) matrix pair."""
    if torch.equal(new.unmerge, old.unmerge) and torch.equal(new.merge, old.merge):
        return replace(new, merge=old.merge, unmerge=old.unmerge)
    return new


@dataclass(frozen=True)
class _State:
    """What a sweep works on: the matches, their version stamps, and the similarity keys
    each solve group's current matches were solved for."""

    matches: dict[str, Match]
    versions: dict[str, int]
    solved: dict[int, tuple[tuple[int, ...], ...]]

    def copy(self) -> _State:
        return _State(dict(self.matches), dict(self.versions), dict(self.solved))

    def restore(self, saved: _State) -> None:
        """Put ``saved`` back into this state's dicts, which the sweep loop holds."""
        _refill(self.matches, saved.matches)
        _refill(self.versions, saved.versions)
        _refill(self.solved, saved.solved)


def _refill(target: dict, source: Mapping) -> None:
    target.clear()
    target.update(source)


class _Best:
    """The best sweep so far, and whether ``patience`` sweeps in a row failed to beat it
    by more than ``tolerance``; under the restart rule, such a sweep is undone."""

    def __init__(self, start: _State, limits: SweepLimits) -> None:
        self.state, self.limits = start.copy(), limits
        self.score, self.stale = -math.inf, 0

    def stalled(self, current: _State) -> bool:
        """Record the sweep that ended in ``current`` (restored to the best under the
        restart rule when it did not improve); True when the search should stop."""
        score = sweep_score(current.matches)
        if score > self.score + self.limits.tolerance:
            self.state, self.score, self.stale = current.copy(), score, 0
            return False
        self.stale += 1
        if self.limits.rule == "restart":
            current.restore(self.state)
        return self.stale >= self.limits.patience
