"""A least-recently-used cache of tensors with a byte budget, for the weight sweeps.

The sweeps cache (N*n)^2 float64 matrices per space and per tensor so that near
convergence most of a sweep is reused.  Unbounded, those caches were most of the memory
of a wide merge (BERT-base: 12 MLP spaces x 3 tensors x 302 MB).  A miss only recomputes
the same value (every entry is a deterministic function of its key), so the budget
changes the time of a merge, never its result.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Generic, TypeVar

import torch

from mudsc.memory import available_bytes

V = TypeVar("V")

CACHE_SHARE = 0.15
"""Share of the free memory (when the cache is made) one sweep cache may hold: the two
caches of a sweep leave 70 % of it to the rest of the merge."""


def default_budget(device: torch.device | str) -> int | None:
    """CACHE_SHARE of the device's free memory; None (unbounded) when it is unknown."""
    free = available_bytes(device)
    return None if free is None else int(free * CACHE_SHARE)


def budget_for(states: Sequence[Mapping[str, torch.Tensor]]) -> int | None:
    """The default budget on the device of the first tensor of ``states``."""
    first = next((t for state in states for t in state.values()), None)
    return default_budget("cpu" if first is None else first.device)


class BoundedCache(Generic[V]):
    """Key -> (stamp, value) with at most ``budget`` bytes of values (None: no bound)."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.used = 0
        self._items: OrderedDict[Hashable, tuple[object, V, int]] = OrderedDict()

    def get(self, key: Hashable, stamp: object) -> V | None:
        """The value stored under ``key`` for ``stamp``, else None."""
        hit = self._items.get(key)
        if hit is None or hit[0] != stamp:
            return None
        self._items.move_to_end(key)
        return hit[1]

    def put(self, key: Hashable, stamp: object, value: V, size: int) -> None:
        """Store (replacing ``key``'s entry), evicting the least recently used as needed;
        a value larger than the whole budget is not kept."""
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= old[2]
        if self.budget is not None and size > self.budget:
            return
        while self.budget is not None and self._items and self.used + size > self.budget:
            _, (_, _, freed) = self._items.popitem(last=False)
            self.used -= freed
        self._items[key] = (stamp, value, size)
        self.used += size
