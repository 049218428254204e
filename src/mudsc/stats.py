"""Activation statistics per merge space (docs/ALGORITHM.md 3.1): first and second moments.

All models see the same calibration batches; the features each space's taps observe are
stacked along channels (model 0's units first), every other axis being an observation.
What is kept are sums (count, sum, sum of outer products), so batches and shards add up
exactly: that is what lets the statistics be accumulated in pieces or all-reduced.

Precision: the per-chunk products run in ``dtype`` (float32 by default: fast on every
device) over at most ``CHUNK_ROWS`` observations and are added into float64
accumulators.  The sums are taken about a fixed per-unit ``shift`` (the mean of the first
chunk), so the cancellation in E[xx^T] - mu mu^T is governed by the spread of the features
and not by their mean: a float32 run matched a float64 run to ~1e-7 of the largest
covariance entry on CPU (~1e-6 with cuBLAS on an H100), also for units whose mean is 100x
their std, where plain float32 sums lose ~1e-3 (see tests/test_stats.py).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mudsc import distributed
from mudsc.errors import ConfigError, DataError, SpecError
from mudsc.modes import eval_mode
from mudsc.precision import full_precision
from mudsc.spaces import permute_state, random_permutations
from mudsc.spaces.spec import MergeSpec, Space, Tap

logger = logging.getLogger(__name__)

CHUNK_ROWS = 4096
"""Observations per float32 product before it is added to the float64 accumulator."""

_DEAD_REL = 1e-12
"""A unit whose variance is below this fraction of its squared mean is constant (dead)."""


# -- moments --------------------------------------------------------------------------


@dataclass(frozen=True)
class SpaceMoments:
    """Streaming first and second moments of one space's stacked features (float64).

    ``sum`` and ``sum_outer`` are sums of ``x - shift`` and of its outer products over
    ``count`` observations; ``shift`` (default zero) only improves precision.
    """

    count: int
    sum: Tensor
    sum_outer: Tensor
    n_models: int
    shift: Tensor | None = None

    @property
    def size(self) -> int:
        """Units per model (n)."""
        return self.sum.shape[0] // self.n_models

    def _shift(self) -> Tensor:
        return torch.zeros_like(self.sum) if self.shift is None else self.shift

    def recentered(self, shift: Tensor) -> SpaceMoments:
        """The same moments taken about another shift (exact up to float64 rounding).

        Use it to give every shard one common shift before all-reducing the raw sums.
        """
        shift = shift.to(self.sum)
        d = self._shift() - shift
        s = self.sum
        outer = self.sum_outer + torch.outer(d, s) + torch.outer(s, d)
        outer = outer + self.count * torch.outer(d, d)
        return SpaceMoments(self.count, s + self.count * d, outer, self.n_models, shift)

    def merged(self, other: SpaceMoments) -> SpaceMoments:
        """Moments of the union of both observation sets."""
        if other.n_models != self.n_models or other.sum.shape != self.sum.shape:
            raise SpecError(
                f"cannot merge moments of {other.n_models} models x {other.size} units into "
                f"moments of {self.n_models} models x {self.size} units"
            )
        other = other.to(self.sum.device).recentered(self._shift())
        return SpaceMoments(
            self.count + other.count,
            self.sum + other.sum,
            self.sum_outer + other.sum_outer,
            self.n_models,
            self.shift,
        )

    def to(self, device: torch.device | str) -> SpaceMoments:
        shift = None if self.shift is None else self.shift.to(device)
        return SpaceMoments(
            self.count, self.sum.to(device), self.sum_outer.to(device), self.n_models, shift
        )

    def _check_count(self) -> None:
        if self.count <= 0:
            raise DataError("these moments hold no observations; collect some data first")

    def mean(self) -> Tensor:
        """E[x], shape (N*n,)."""
        self._check_count()
        return self._shift() + self.sum / self.count

    def covariance(self) -> Tensor:
        """E[x x^T] - E[x] E[x]^T (population covariance), shape (N*n, N*n)."""
        self._check_count()
        m = self.sum / self.count
        cov = self.sum_outer / self.count
        cov -= torch.outer(m, m)  # in place: one (N*n)^2 temporary fewer, same values
        sym = cov + cov.T
        sym /= 2
        return sym

    def correlation(self, eps: float = 1e-7) -> Tensor:
        """Pearson correlation Sigma / max(sigma sigma^T, eps); dead units get 0 rows."""
        return pearson(self.covariance(), self.mean(), eps)


def pearson(cov: Tensor, mean: Tensor, eps: float) -> Tensor:
    """Correlation from a covariance: cov / max(sigma sigma^T, eps), never NaN.

    A unit whose variance is zero, or negligible against its squared mean (a constant
    feature up to rounding), is dead: its row and column are 0.
    """
    var = cov.diagonal().clamp_min(0)
    dead = var <= _DEAD_REL * mean.square()
    sigma = var.sqrt()
    corr = torch.outer(sigma, sigma).clamp_min_(eps)  # in place from here on: same values,
    torch.div(cov, corr, out=corr)  # fewer (N*n)^2 temporaries
    corr.masked_fill_(dead[:, None] | dead[None, :], 0.0)
    return corr.clamp_(-1.0, 1.0)


# -- accumulation ---------------------------------------------------------------------


def model_gram(x: Tensor, n_models: int) -> Tensor:
    """x.T @ x for x whose columns are n_models equal blocks (one per model), computing
    only the blocks on and above the diagonal and mirroring the rest: a quarter fewer
    products for two models, 20-40 % faster on CPU at the widths of a merge."""
    width = x.shape[1]
    size = width // n_models
    if n_models == 1 or size * n_models != width:
        return x.T @ x
    out = x.new_empty(width, width)
    cols = x.split(size, dim=1)
    for i in range(n_models):
        for j in range(i, n_models):
            block = cols[i].T @ cols[j]
            out[i * size : (i + 1) * size, j * size : (j + 1) * size] = block
            if i != j:
                out[j * size : (j + 1) * size, i * size : (i + 1) * size] = block.T
    return out


class _Accumulator:
    """Float64 sums of one space, fed with per-model feature blocks of equal row count."""

    def __init__(self, width: int, n_models: int, device: torch.device, dtype: torch.dtype):
        self.n_models = n_models
        self.dtype = dtype
        self.count = 0
        self.shift: Tensor | None = None
        self.priming = False
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(width, width, dtype=torch.float64, device=device)

    def add(self, parts: Sequence[Tensor]) -> None:
        with full_precision(parts[0].device):  # the products never run under autocast
            self._add(parts)

    def _add(self, parts: Sequence[Tensor]) -> None:
        rows = parts[0].shape[0]
        for r in range(0, rows, CHUNK_ROWS):  # a few large kernels per chunk, none per unit
            x = torch.cat([p[r : r + CHUNK_ROWS] for p in parts], dim=1).to(self.dtype)
            if self.shift is None:
                self.shift = x.mean(dim=0)
            if self.priming:
                return
            x -= self.shift  # x is a fresh copy made by cat
            self.sum += x.sum(dim=0)
            self.sum_outer += model_gram(x, self.n_models)
        self.count += rows

    def moments(self) -> SpaceMoments:
        shift = None if self.shift is None else self.shift.to(torch.float64)
        return SpaceMoments(self.count, self.sum, self.sum_outer, self.n_models, shift)


class _Recorder:
    """Pairs the features of one tap call across models and feeds the accumulator.

    Models run one after another on a batch; models 0..N-2 stash their features, the last
    model's hook stacks them with its own and accumulates at once, so at most N-1 models'
    features are held.  Calls are counted per tap, so a module called twice per forward
    yields two observation sets, paired call by call.
    """

    def __init__(self, n_models: int, accumulators: Mapping[str, _Accumulator]):
        self.n_models = n_models
        self.acc = accumulators
        self.stash: dict[tuple[str, int, int], list[Tensor]] = {}
        self.calls: dict[tuple[int, str, int], int] = {}

    def observe(self, model: int, space: str, tap: int, feats: Tensor) -> None:
        call = self.calls.get((model, space, tap), 0)
        self.calls[(model, space, tap)] = call + 1
        key = (space, tap, call)
        if model < self.n_models - 1:
            self.stash.setdefault(key, []).append(feats)
            return
        parts = self.stash.pop(key, []) + [feats]
        if len(parts) != self.n_models or any(p.shape != feats.shape for p in parts):
            raise SpecError(
                f"space {space!r}: tap {tap} saw different features in different models "
                f"({[tuple(p.shape) for p in parts]}); merging needs models of one architecture"
            )
        self.acc[space].add(parts)

    def end_batch(self) -> None:
        if self.stash:
            space, tap, _ = next(iter(self.stash))
            raise SpecError(
                f"space {space!r}: tap {tap} fired in some models but not in the last one; "
                "merging needs models of one architecture"
            )
        self.calls.clear()


def _features(x: Any, tap: Tap, n: int, proj: tuple[Tensor, Tensor | None] | None) -> Tensor:
    """The tapped tensor -> (observations, n): units last, everything else flattened."""
    if not isinstance(x, Tensor):
        raise SpecError(f"tap at {tap.module!r} ({tap.side}) did not see a tensor")
    axis = tap.axis % x.dim() if -x.dim() <= tap.axis < x.dim() else None
    if axis is None:
        raise SpecError(f"tap at {tap.module!r}: the tensor has no axis {tap.axis}")
    if proj is not None:
        weight, bias = proj
        return F.linear(x.movedim(axis, -1).to(weight.dtype), weight, bias).reshape(-1, n)
    stop = tap.start + n * tap.inner
    if stop > x.shape[axis]:
        raise SpecError(
            f"tap at {tap.module!r}: needs positions {tap.start}..{stop - 1} of axis "
            f"{tap.axis} but the tensor has shape {tuple(x.shape)}"
        )
    x = x.narrow(axis, tap.start, n * tap.inner).unflatten(axis, (n, tap.inner))
    return x.movedim(axis, -1).reshape(-1, n)


def _projection(model: nn.Module, tap: Tap, n: int, where: str) -> tuple[Tensor, Tensor | None]:
    """Rows project_start..+n of the tap's projection weight and bias, from this model."""
    if tap.project_weight is None:
        raise SpecError(f"{where}: project_bias is set but project_weight is not")
    if tap.start != 0 or tap.inner != 1:
        raise SpecError(
            f"{where}: a projected tap selects rows with project_start; start and inner "
            "must stay 0 and 1"
        )
    state = model.state_dict()
    out = []
    for key in (tap.project_weight, tap.project_bias):
        if key is None:
            out.append(None)
            continue
        if key not in state:
            raise SpecError(f"{where}: the model has no tensor {key!r} to project with")
        t = state[key]
        if t.shape[0] < tap.project_start + n:
            raise SpecError(
                f"{where}: {key!r} has {t.shape[0]} rows, the tap needs rows "
                f"{tap.project_start}..{tap.project_start + n - 1}"
            )
        out.append(t[tap.project_start : tap.project_start + n])
    return out[0], out[1]


def _hook(recorder: _Observer, model: int, space: Space, index: int, tap: Tap, proj) -> Callable:
    def observe(x: Any) -> None:
        recorder.observe(model, space.name, index, _features(x, tap, space.size, proj))

    if tap.side == "input":

        def pre_hook(module: nn.Module, args: tuple) -> None:
            if tap.arg >= len(args):
                raise SpecError(
                    f"space {space.name!r}: tap at {tap.module!r} wants positional input "
                    f"{tap.arg} but the module got {len(args)}"
                )
            observe(args[tap.arg])

        return pre_hook

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, (tuple, list)):
            output = output[tap.arg]
        observe(output)

    return post_hook


def _device(device: torch.device | str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{device!r} is not a torch device (e.g. 'cpu', 'cuda:0')") from exc
    if dev.type == "meta":
        raise ConfigError("statistics need real tensors; the 'meta' device holds none")
    return dev


@contextmanager
def batch_fits(what: str) -> Iterator[None]:
    """Report torch's failure to run the model on a batch (another input shape, a batch
    of one in BatchNorm's training mode) as one line naming the batch; a MudscError (a
    tap's own) passes unchanged."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{what} does not fit the model: {first}") from exc


def _model_device(model: nn.Module) -> torch.device:
    first = next(iter(list(model.parameters()) + list(model.buffers())), None)
    return torch.device("cpu") if first is None else first.device


def _check_device(models: Sequence[nn.Module], device: torch.device) -> None:
    for i, model in enumerate(models):
        for t in list(model.parameters()) + list(model.buffers()):
            same = t.device.type == device.type and (
                device.index is None or t.device.index == device.index
            )
            if not same:
                raise ConfigError(
                    f"model {i} has tensors on {t.device} but statistics run on {device}; "
                    "move the models there with model.to(device)"
                )


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


def _forward(model: nn.Module, batch: Any, device: torch.device) -> None:
    """A batch is a tensor, an (input, label, ...) tuple/list, or a dict of keyword inputs."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("a calibration batch is an empty tuple; pass (inputs, ...)")
        batch = batch[0]
    if isinstance(batch, Mapping):
        model(**_move(batch, device))
    else:
        model(_move(batch, device))


def _selected_spaces(spec: MergeSpec, spaces: Iterable[str] | None) -> list[Space]:
    chosen = list(spec.mergeable) if spaces is None else [spec.space(n) for n in spaces]
    for s in chosen:
        if not s.taps:
            raise SpecError(
                f"space {s.name!r} has no tap, so its activations cannot be observed; add a "
                "Tap to the spec or leave the space out with spaces=[...]"
            )
    return chosen


def collect_moments(
    models: Sequence[nn.Module],
    spec: MergeSpec,
    batches: Iterable[Any],
    device: torch.device | str | None = None,
    spaces: Iterable[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, SpaceMoments]:
    """Run every model on the same batches and return each space's stacked moments.

    ``spaces`` defaults to every mergeable space (each needs a tap).  ``device`` defaults to
    the first model's; the models must already be there, batches are moved there.  Models
    run in eval mode without gradients; their modes are restored and every hook removed,
    also on error.  One forward pass per model per batch.  Inside a process group every
    rank passes the same batches, runs its share and gets the moments of all of them.
    """
    models = list(models)
    if not models:
        raise ConfigError("collect_moments needs at least one model")
    dev = _device(device) if device is not None else _model_device(models[0])
    _check_device(models, dev)
    chosen = _selected_spaces(spec, spaces)
    n_models = len(models)
    accs = {s.name: _Accumulator(n_models * s.size, n_models, dev, dtype) for s in chosen}
    recorder = _Recorder(n_models, accs)
    n_batches = 0
    with ExitStack() as stack:
        for i, model in enumerate(models):
            _attach(stack, recorder, i, model, chosen)
        stack.enter_context(eval_mode(*models))
        stack.enter_context(distributed.guard())
        with torch.no_grad():
            batches = _primed(models, accs, recorder, batches, dev)
            for k, batch in distributed.shard(enumerate(batches)):
                for i, model in enumerate(models):
                    with batch_fits(f"calibration batch {k} (model {i})"):
                        _forward(model, batch, dev)
                recorder.end_batch()
                n_batches += 1
    if distributed.active():
        n_batches = _shared(accs, n_batches)
    if n_batches == 0:
        raise DataError(
            "no calibration data: the batches iterable is empty; pass at least one batch"
        )
    result = {name: _finished(name, acc) for name, acc in accs.items()}
    logger.debug("collected moments of %d spaces over %d batches", len(result), n_batches)
    return result


def _primed(
    models: Sequence[nn.Module],
    accs: Mapping[str, _Accumulator],
    recorder: _Recorder,
    batches: Iterable[Any],
    device: torch.device,
) -> Iterable[Any]:
    """Off rank 0, the shifts one process takes (from batch 0's first chunk) set before this
    rank's shard runs, so that its float32 products are the ones one process computes and
    the combined moments equal its own to float64 rounding.  Costs one batch per rank."""
    if distributed.rank() == 0:
        return batches
    rest = iter(batches)
    first = next(rest, None)
    if first is None:
        return []
    for acc in accs.values():
        acc.priming = True
    try:
        for model in models:
            _forward(model, first, device)
        recorder.end_batch()
    finally:
        for acc in accs.values():
            acc.priming = False
    return itertools.chain([first], rest)


def _shared(accs: Mapping[str, _Accumulator], n_batches: int) -> int:
    """Every rank's sums added into its accumulators (each rank ran a shard of the batches);
    returns the batches run by all ranks."""
    merged = distributed.combine_space_moments({n: a.moments() for n, a in accs.items()})
    for name, acc in accs.items():
        m = merged[name]
        acc.count, acc.sum, acc.sum_outer, acc.shift = m.count, m.sum, m.sum_outer, m.shift
    return int(distributed.sum_values(n_batches)[0])


class _Capture:
    """Keeps every tap call's features per model (for :func:`shuffled_spaces`)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int, int], list[Tensor]] = {}
        self.calls: dict[tuple[int, str, int], int] = {}

    def observe(self, model: int, space: str, tap: int, feats: Tensor) -> None:
        call = self.calls.get((model, space, tap), 0)
        self.calls[(model, space, tap)] = call + 1
        self.seen.setdefault((space, tap, call), []).append(feats)


_Observer = _Recorder | _Capture


def shuffled_spaces(
    model: nn.Module, spec: MergeSpec, example: Any, spaces: Iterable[str] | None = None
) -> list[str]:
    """The spaces whose taps see other merge spaces on their observation axes.

    A token-mixing MLP (MLP-Mixer) is observed over batch x channels, and the channel
    axis is itself a merge space: observation rows then hold different channels in
    different models, and statistics pooled over them compare unlike with unlike.  The
    check needs no graph, so it covers hand specs too: a copy of ``model`` with every
    space permuted at random runs on ``example``; a space's features must equal the
    original's with its own units permuted, row by row, unless another space moved rows.
    """
    chosen = _selected_spaces(spec, spaces)
    if not chosen:
        return []
    perms = random_permutations(spec, torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    twin.load_state_dict(permute_state(model.state_dict(), spec, perms))
    capture = _Capture()
    device = _model_device(model)
    with ExitStack() as stack:
        for i, m in enumerate((model, twin)):
            _attach(stack, capture, i, m, chosen)
        stack.enter_context(eval_mode(model, twin))
        with torch.no_grad():
            for m in (model, twin):
                _forward(m, example, device)
    return sorted(
        {
            space
            for (space, _, _), parts in capture.seen.items()
            if len(parts) != 2 or not _rows_agree(parts[0], parts[1], perms[space])
        }
    )


def _rows_agree(original: Tensor, permuted: Tensor, src: Tensor) -> bool:
    """Whether ``permuted`` is ``original`` with its units (columns) reordered by ``src``."""
    if original.shape != permuted.shape:
        return False
    want = original[:, src.to(original.device)]
    tol = torch.finfo(original.dtype).eps ** 0.5 if original.is_floating_point() else 0.0
    return bool((want - permuted).abs().max() <= tol * want.abs().max())


def _attach(
    stack: ExitStack,
    recorder: _Observer,
    i: int,
    model: nn.Module,
    spaces: Sequence[Space],
) -> None:
    """Hook every tap of ``spaces`` in model ``i``; ``stack`` removes the hooks."""
    for space in spaces:
        for k, tap in enumerate(space.taps):
            where = f"space {space.name!r}, tap {k} ({tap.module!r})"
            try:
                module = model.get_submodule(tap.module)
            except AttributeError as exc:
                raise SpecError(f"{where}: model {i} has no such module") from exc
            proj = None
            if tap.project_weight is not None or tap.project_bias is not None:
                proj = _projection(model, tap, space.size, where)
            hook = _hook(recorder, i, space, k, tap, proj)
            handle = (
                module.register_forward_pre_hook(hook)
                if tap.side == "input"
                else module.register_forward_hook(hook)
            )
            stack.callback(handle.remove)


def _finished(name: str, acc: _Accumulator) -> SpaceMoments:
    """The moments of one space, refused when no tap fired or a value is not finite."""
    if acc.count == 0:
        raise SpecError(
            f"space {name!r}: none of its taps fired during the forward passes; check "
            "the taps' module paths"
        )
    if not (torch.isfinite(acc.sum).all() and torch.isfinite(acc.sum_outer).all()):
        raise DataError(
            f"space {name!r}: its activations are not finite (NaN or inf) on the "
            "calibration data; check the models' weights and the inputs"
        )
    return acc.moments()
