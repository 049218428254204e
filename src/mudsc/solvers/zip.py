"""Zip: ZipIt!'s greedy merging of the most similar clusters (docs/ALGORITHM.md 4.2).

The naive version recomputes a full argmax over the (N*n)^2 matrix at every step and
copies or shrinks the matrix; this one keeps one working copy on the similarity's device,
masks merged clusters with -inf, and caches every row's best legal partner so that a step
only rescans the few rows whose best partner changed.  A step costs O(N*n) plus
O(N*n) per stale row instead of O((N*n)^2).  On the GPU the loop runs in torch on the
similarity's device; on the CPU the same loop, step for step, runs in NumPy, whose
per-call overhead is a tenth of torch's on rows this short.

Rules (owner sets, not index ranges, decide what is legal):

* the similarity of a merged cluster to any other is the minimum of its two parts'
  (complete linkage), times ``a`` when ``a > 0``;
* a merge of two clusters that both hold units of model m is a *within-model* merge for m
  (for singletons: two units of the same model) and spends one unit of m's budget
  floor(floor((N*n - n)/N) * b); a model with no budget left makes no more such merges
  (a budget of 0 forbids them from the start);
* with ``a <= 0`` no within-model merge is ever legal and similarities are not damped;
* if no legal merge is left while merges are still needed (possible for N >= 3), the most
  similar pair is merged anyway and a warning is logged: the solver never hangs.

``value`` is the mean of the picked entries as the greedy saw them (complete linkage,
with damping).  An asymmetric S is symmetrised as (S + S^T) / 2.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from mudsc.errors import ConfigError
from mudsc.solvers.checks import check_similarity, match_from_labels
from mudsc.solvers.match import Match

log = logging.getLogger(__name__)

_MAX_MODELS = 62  # owner sets are int64 bit masks
_GRAIN = 32768  # elements: torch runs smaller CPU ops on one thread
_NUMPY_ON_CPU = True  # CPU similarities take the NumPy loop (tests switch it off)


def check_zip_params(a: float, b: float, n_models: int) -> None:
    """Reject damping/budget values that would make the greedy meaningless."""
    for name, value in (("damping a", a), ("budget factor b", b)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"zip {name} must be a number, got {value!r}.")
    if not math.isfinite(a):
        raise ConfigError(f"zip damping a must be a finite number, got {a!r}.")
    if not math.isfinite(b) or b < 0:
        raise ConfigError(f"zip budget factor b must be a finite number >= 0, got {b!r}.")
    if n_models > _MAX_MODELS:
        raise ConfigError(f"zip supports at most {_MAX_MODELS} models, got {n_models}.")


def zip_budget(n: int, n_models: int, b: float) -> int:
    """Within-model merges allowed per model: floor(floor((N*n - n)/N) * b)."""
    return math.floor(((n_models * n - n) // n_models) * b + 1e-9)


def zip_match(similarity: torch.Tensor, n_models: int, a: float = 0.5, b: float = 1.0) -> Match:
    """Greedily merge the N*n units into n clusters (ZipIt!); see the module docstring."""
    n = check_similarity(similarity, n_models)
    check_zip_params(a, b, n_models)
    owner = torch.arange(n_models, device=similarity.device).repeat_interleave(n)
    labels, picked = zip_clusters(similarity, owner, n_models, n, a, zip_budget(n, n_models, b))
    value = sum(picked) / len(picked) if picked else 0.0
    return match_from_labels(labels, n, n_models, value)


def zip_clusters(
    similarity: torch.Tensor,
    owner: torch.Tensor,
    n_models: int,
    n_out: int,
    a: float,
    budget: int,
) -> tuple[torch.Tensor, list[float]]:
    """Cluster the m units of ``similarity`` into ``n_out`` clusters.

    ``owner[u]`` is the model of unit u.  Returns every unit's cluster (0..n_out-1,
    clusters ordered by their lowest unit index) and the picked similarities.
    The input is not modified.
    """
    device = similarity.device
    work = (similarity.detach() + similarity.detach().T) / 2
    if device.type == "cpu" and _NUMPY_ON_CPU:
        if work.dtype not in (torch.float32, torch.float64):
            work = work.to(torch.float64)
        parent, picked, forced = _greedy_numpy(
            work.numpy(), owner.numpy(), n_models, n_out, a, budget
        )
    else:
        parent, picked, forced = _greedy_torch(work, owner, n_models, n_out, a, budget)
    m = similarity.shape[0]
    if forced:
        log.warning(
            "zip: %d of %d merges had no legal partner left (a <= 0 with %d models) and "
            "merged the most similar pair anyway, putting two units of one model together",
            forced,
            m - n_out,
            n_models,
        )
    roots = [_root(parent, u) for u in range(m)]
    _, labels = torch.unique(torch.tensor(roots, device=device), sorted=True, return_inverse=True)
    return labels, picked


class _Budget:
    """Owner sets and within-model budgets: the legality rule both greedy loops share.

    Owner sets are bit masks.  ``tag`` is what the legality rule reads: with a <= 0 the
    owner set (no two clusters sharing a model may merge), else the owner set of *pure*
    (single-model) clusters and 0 for mixed ones (only pure-with-pure merges of one model
    are within-model).  A pair is illegal when tag[r] & tag[c] & forbid != 0.
    """

    def __init__(self, owner: list[int], n_models: int, a: float, budget: int) -> None:
        self.own = [1 << k for k in owner]
        self.a, self.budget = a, budget
        self.forbid = (1 << n_models) - 1 if a <= 0 or budget <= 0 else 0
        self.spent = [0] * n_models

    def merge(self, i: int, j: int) -> tuple[int, int]:
        """Record that cluster j joins cluster i; returns i's new tag and the owner bits
        newly forbidden because their budget ran out (0 if none)."""
        own = self.own
        exhausted = 0
        if self.a > 0 and own[i] == own[j] and _single(own[i]):
            k = own[i].bit_length() - 1
            self.spent[k] += 1
            if self.spent[k] >= self.budget:
                exhausted = own[i] & ~self.forbid
        self.forbid |= exhausted
        own[i] |= own[j]
        tag_i = own[i] if self.a <= 0 or _single(own[i]) else 0
        return tag_i, exhausted


def _greedy_torch(
    work: torch.Tensor, owner: torch.Tensor, n_models: int, n_out: int, a: float, budget: int
) -> tuple[list[int], list[float], int]:
    """The greedy loop on the similarity's device (GPU): masked, cached row maxima."""
    m = work.shape[0]
    device = work.device
    neg = float("-inf")
    work.fill_diagonal_(neg)
    rules = _Budget(owner.tolist(), n_models, a, budget)
    tag = torch.ones_like(owner).bitwise_left_shift(owner)
    parent = list(range(m))

    def best(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best legal partner of each row (dead clusters are -inf in ``work``)."""
        values = work.index_select(0, rows)
        if rules.forbid:
            clash = (tag.index_select(0, rows)[:, None] & tag[None, :]).bitwise_and_(rules.forbid)
            values = values.masked_fill_(clash != 0, neg)
        # argmax + gather: Tensor.max(dim=1) is pathologically slow on short CPU rows
        args = values.argmax(dim=1)
        return values.gather(1, args[:, None]).squeeze(1), args

    def refresh(rows: torch.Tensor) -> None:
        """Recompute the cached best partner of ``rows``, in slices small enough that
        torch runs them on one thread (thread start-up dominates such small ops)."""
        for start in range(0, rows.numel(), chunk):
            part = rows[start : start + chunk]
            rowmax[part], rowarg[part] = best(part)

    rowmax = torch.empty(m, dtype=work.dtype, device=device)
    rowarg = torch.empty(m, dtype=torch.long, device=device)
    chunk = max(1, _GRAIN // m)
    refresh(torch.arange(m, device=device))

    picked: list[float] = []
    forced = 0
    for _ in range(m - n_out):
        r, c, value, stuck = _pick(rowmax, rowarg, work)
        forced += stuck
        i, j = min(r, c), max(r, c)
        picked.append(value)
        parent[j] = i
        tag_i, exhausted = rules.merge(i, j)
        tag[i] = tag_i

        merged = torch.minimum(work[i], work[j])
        if a > 0:
            merged.mul_(a)
        work.select(0, i).copy_(merged)
        work.select(1, i).copy_(merged)
        work.select(0, j).fill_(neg)
        work.select(1, j).fill_(neg)

        # Rows whose cached partner was i or j may have lost it; i and j changed wholly;
        # rows of a newly exhausted model lost their pure same-model partners.
        stale = (rowarg == i).logical_or_(rowarg == j)
        if exhausted:
            stale.logical_or_(tag.bitwise_and(exhausted) != 0)
        # Every other row's best can only change through its entry in column i.
        if tag_i & rules.forbid:
            merged = merged.masked_fill(tag.bitwise_and(tag_i & rules.forbid) != 0, neg)
        better = merged > rowmax
        rowmax = torch.where(better, merged, rowmax)
        rowarg = torch.where(better, i, rowarg)
        refresh(torch.cat([stale.nonzero().squeeze(1), rowarg.new_tensor([i, j])]))
    return parent, picked, forced


def _greedy_numpy(
    work: np.ndarray, owner: np.ndarray, n_models: int, n_out: int, a: float, budget: int
) -> tuple[list[int], list[float], int]:
    """The same loop as ``_greedy_torch``, step for step, in NumPy: on the CPU a step is
    a few dozen operations on rows of ~1,000 numbers, where torch's per-call overhead
    (microseconds) is most of the time."""
    m = work.shape[0]
    neg = -np.inf
    np.fill_diagonal(work, neg)
    rules = _Budget(owner.tolist(), n_models, a, budget)
    tag = np.left_shift(np.int64(1), owner.astype(np.int64))
    parent = list(range(m))

    def best(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = work[rows]
        if rules.forbid:
            values[(tag[rows][:, None] & tag[None, :] & rules.forbid) != 0] = neg
        args = values.argmax(axis=1)
        return values[np.arange(rows.size), args], args

    rowmax, rowarg = best(np.arange(m))
    picked: list[float] = []
    forced = 0
    for _ in range(m - n_out):
        r, c, value, stuck = _pick(rowmax, rowarg, work)
        forced += stuck
        i, j = min(r, c), max(r, c)
        picked.append(value)
        parent[j] = i
        tag_i, exhausted = rules.merge(i, j)
        tag[i] = tag_i

        merged = np.minimum(work[i], work[j])
        if a > 0:
            merged *= a
        work[i] = merged
        work[:, i] = merged
        work[j] = neg
        work[:, j] = neg

        stale = (rowarg == i) | (rowarg == j)
        if exhausted:
            stale |= (tag & exhausted) != 0
        if tag_i & rules.forbid:
            merged = np.where((tag & (tag_i & rules.forbid)) != 0, neg, merged)
        better = merged > rowmax
        rowmax = np.where(better, merged, rowmax)
        rowarg = np.where(better, i, rowarg)
        rows = np.concatenate([np.flatnonzero(stale), [i, j]])
        rowmax[rows], rowarg[rows] = best(rows)
    return parent, picked, forced


_Array = torch.Tensor | np.ndarray


def _pick(rowmax: _Array, rowarg: _Array, work: _Array) -> tuple[int, int, float, bool]:
    """The pair to merge next: the best cached legal pair or, when no legal pair is left
    (a <= 0, N >= 3), the most similar pair of all (flagged as forced)."""
    r = int(rowmax.argmax())
    value = float(rowmax[r])
    if value != float("-inf"):
        return r, int(rowarg[r]), value, False
    r, c = divmod(int(work.argmax()), work.shape[0])
    return r, c, float(work[r, c]), True


def _single(mask: int) -> bool:
    """Whether an owner bit mask names exactly one model."""
    return mask & (mask - 1) == 0


def _root(parent: list[int], u: int) -> int:
    """The surviving cluster index of unit u (path-halving union-find lookup)."""
    while parent[u] != u:
        parent[u] = parent[parent[u]]
        u = parent[u]
    return u
