"""Calibration passes spread over ranks with torch.distributed (gloo on CPUs, NCCL on GPUs).

The one module that talks to torch.distributed.  Inside an initialised process group of
K > 1 ranks every rank passes the same calibration batches; each forward-pass loop runs its
share (batch i on rank i mod K, :func:`shard`) and the partial results are combined in
float64 so that every rank ends with what one process computes on all the batches.
Without a group (or with one rank) every function here returns its input after one check.

Failures: a rank that fails must not leave the others waiting in a collective.  Every
synchronisation starts with an exchange (an all_gather of a small object) that carries each
rank's failure, if any; a local loop runs under :func:`guard`, which announces its error in
such an exchange, pairing with the peers' next one, and the peers raise the same error
class, "rank R failed: ...".  :func:`session` (the CLI's process group) also announces
errors raised outside guarded loops and ends with an exchange that is the barrier after
rank 0's writes.  A finite process-group timeout is the last resort.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mudsc import errors
from mudsc.errors import ConfigError, MudscError
from mudsc.moments import combine

if TYPE_CHECKING:
    from mudsc.solvers.match import Match
    from mudsc.stats import SpaceMoments

log = logging.getLogger(__name__)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
Part = tuple[int, Tensor, Tensor]
"""(count, mean, M2) of per-channel statistics."""

TIMEOUT_ENV = "MUDSC_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800
_SHARED = "_mudsc_shared_with_ranks"
"""Attribute set on an exception once every rank has been told about it."""


@dataclass(frozen=True)
class _Failure:
    rank: int
    kind: type[MudscError]
    message: str


class _Control:
    """The group for small-object exchanges: the default one when it runs gloo, else a gloo
    group made once (NCCL moves objects only through GPU memory)."""

    group: Any = None


# -- who am I -------------------------------------------------------------------------------


def active() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_root() -> bool:
    """Rank 0 (also a single process): the one that writes and prints."""
    return rank() == 0


def shard(items: Iterable[T]) -> Iterable[T]:
    """This rank's share of ``items``: item i goes to rank i mod K (deterministic, lazy for
    iterables).  Rank 0 holds item 0, whose statistics set the precision shift."""
    if not active():
        return items
    if isinstance(items, (list, tuple, range)):
        return items[rank() :: world_size()]
    return _every(items, rank(), world_size())


def _every(items: Iterable[T], start: int, step: int) -> Iterator[T]:
    for i, item in enumerate(items):
        if i % step == start:
            yield item


# -- process group --------------------------------------------------------------------------


def _timeout() -> timedelta:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds; "
                          "set it to e.g. 1800 or unset it")  # fmt: skip
    return timedelta(seconds=seconds)


def _init_from_env() -> bool:
    """Join the group torchrun describes (WORLD_SIZE > 1) unless one exists; True if made."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    gpu = torch.cuda.is_available() and dist.is_nccl_available()
    dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo", timeout=_timeout())
    log.info("rank %d of %d joined the process group", dist.get_rank(), dist.get_world_size())
    return True


def _control() -> Any:
    if "gloo" in str(dist.get_backend()):
        return None
    if _Control.group is None:
        _Control.group = dist.new_group(backend="gloo", timeout=_timeout())
    return _Control.group


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this rank's GPU (LOCAL_RANK) under torchrun."""
    if device.type != "cuda" or device.index is not None or not active():
        return device
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@contextmanager
def session() -> Iterator[None]:
    """The command line's process group: joined from torchrun's environment when none is
    initialised, left at the end.  Ends with an exchange, the barrier that lets the other
    ranks exit 0 only once rank 0 has written; an error raised anywhere inside is shared
    with every rank (unless a guard already did)."""
    created = _init_from_env()
    try:
        yield
        if active():
            _exchange(None)
    except Exception as exc:
        if active() and not getattr(exc, _SHARED, False):
            _announce(exc)
        raise
    finally:
        if created:
            dist.destroy_process_group()
            _Control.group = None


def launched(fn: F) -> F:
    """Run a command inside :func:`session` (place it under ``friendly``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with session():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# -- failures -------------------------------------------------------------------------------


def _failure(exc: BaseException) -> _Failure:
    """What the peers raise: the same mudsc error class, or MudscError for anything else."""
    own = isinstance(exc, MudscError) and getattr(errors, type(exc).__name__, None) is type(exc)
    message = str(exc) if isinstance(exc, MudscError) else f"{type(exc).__name__}: {exc}"
    lines = message.strip().splitlines() or [type(exc).__name__]
    return _Failure(rank(), type(exc) if own else MudscError, lines[0])


def _gather(payload: tuple[_Failure | None, Any]) -> list[tuple[_Failure | None, Any]]:
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, payload, group=_control())
    return out


def _announce(exc: BaseException) -> None:
    """Tell every rank (at its next exchange) that this one failed."""
    setattr(exc, _SHARED, True)
    try:
        _gather((_failure(exc), None))
    except Exception as comm:  # the peers may be gone already; the original error matters
        log.debug("could not share the failure with the other ranks: %s", comm)


def _exchange(value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order; raises the first rank's failure instead."""
    rows = _gather((None, value))
    failed = [f for f, _ in rows if f is not None]
    if failed:
        first = failed[0]
        error = first.kind(f"rank {first.rank} failed: {first.message}")
        setattr(error, _SHARED, True)
        raise error
    return [v for _, v in rows]


@contextmanager
def guard() -> Iterator[None]:
    """Local work (this rank's forward passes): an error in it is announced before it
    propagates, so that the peers, waiting at their next exchange, raise it too."""
    try:
        yield
    except Exception as exc:
        if active() and not getattr(exc, _SHARED, False):
            _announce(exc)
        raise


# -- combining the ranks' results -----------------------------------------------------------


def sum_values(*values: float) -> tuple[float, ...]:
    """Each value summed over the ranks (in rank order: the same result everywhere)."""
    if not active():
        return values
    rows = _exchange(values)
    return tuple(sum(row[i] for row in rows) for i in range(len(values)))


def gather_items(local: Mapping[T, Any]) -> dict[T, Any]:
    """The union of every rank's items (each rank computed the keys of its shard)."""
    if not active():
        return dict(local)
    union: dict[T, Any] = {}
    for part in _exchange(dict(local)):
        union.update(part)
    return union


def combine_parts(local: Mapping[str, Part | None]) -> dict[str, Part | None]:
    """Per key, every rank's (count, mean, M2) merged in rank order (Chan's formula, float64,
    on the CPU); None where no rank saw the key."""
    if not active():
        return dict(local)
    shipped = {k: None if p is None else (p[0], p[1].cpu(), p[2].cpu()) for k, p in local.items()}
    ranks = _exchange(shipped)
    out: dict[str, Part | None] = {}
    for key in local:
        total: Part | None = None
        for part in (r[key] for r in ranks):
            if part is None:
                continue
            if total is None:
                total = part
            else:
                count, mean, m2 = combine(*total, *part)
                total = (int(count), mean, m2)
        out[key] = total
    return out


def combine_batchnorm(norms: Sequence[nn.Module]) -> None:
    """Every rank's running statistics (a cumulative average over its shard) made the
    average over all batches.  torch's momentum=None average weighs every batch alike, so
    rank r's average counts k_r / K (k_r: its num_batches_tracked), summed in float64."""
    if not active():
        return
    mods = [m for m in norms if getattr(m, "running_mean", None) is not None]
    local = [
        (int(m.num_batches_tracked), m.running_mean.double().cpu(), m.running_var.double().cpu())
        for m in mods
    ]
    ranks = _exchange(local)
    for i, m in enumerate(mods):
        parts = [r[i] for r in ranks]
        total = sum(k for k, _, _ in parts)
        if total == 0:
            continue
        mean = sum(k * mu for k, mu, _ in parts) / total
        var = sum(k * v for k, _, v in parts) / total
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.fill_(total)


def combine_space_moments(local: Mapping[str, SpaceMoments]) -> dict[str, SpaceMoments]:
    """Every rank's sums per space added in float64 about one common shift: that of the first
    rank with data (rank 0 holds batch 0, whose first chunk gives one process its shift).
    An all-reduce leaves the same sums on every rank, with no copy per rank."""
    if not active():
        return dict(local)
    counts = _exchange({k: m.count for k, m in local.items()})
    out = {}
    for name in sorted(local):
        mine = local[name]
        src = next((r for r, c in enumerate(counts) if c[name] > 0), None)
        if src is None:
            out[name] = mine
            continue
        shift = mine.shift if mine.shift is not None else torch.zeros_like(mine.sum)
        shift = _broadcast(shift.to(mine.sum), src)
        mine = mine.recentered(shift)
        total = sum(c[name] for c in counts)
        out[name] = replace(
            mine, count=total, sum=_all_reduce(mine.sum), sum_outer=_all_reduce(mine.sum_outer)
        )
    return out


def _device_for(t: Tensor) -> torch.device:
    """Where the group moves tensors: the CPU for gloo, this rank's GPU for NCCL."""
    backend = str(dist.get_backend())
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _broadcast(t: Tensor, src: int) -> Tensor:
    buf = t.to(_device_for(t), copy=True).contiguous()
    dist.broadcast(buf, src)
    return buf.to(t.device)


def _all_reduce(t: Tensor) -> Tensor:
    buf = t.to(_device_for(t), copy=True).contiguous()
    dist.all_reduce(buf)
    return buf.to(t.device)


def agreed(matches: Mapping[str, Match]) -> Mapping[str, Match]:
    """Rank 0's matches on every rank.  Each rank solves on bitwise equal inputs, so the
    matches agree; a digest checks it, and where the ranks' arithmetic differs (unlike
    machines) rank 0's matches are sent to all."""
    if not active():
        return matches
    digest = hashlib.sha256()
    for name in sorted(matches):
        digest.update(name.encode())
        digest.update(matches[name].unmerge.detach().double().cpu().contiguous().numpy().tobytes())
    if len(set(_exchange(digest.hexdigest()))) == 1:
        return matches
    log.warning("the ranks' matchings differ (unlike arithmetic); all use rank 0's")
    box = [{k: m.to("cpu") for k, m in matches.items()}]
    dist.broadcast_object_list(box, src=0, group=_control())
    device = next(iter(matches.values())).merge.device
    return {k: m.to(device) for k, m in box[0].items()}
