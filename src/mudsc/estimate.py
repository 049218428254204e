"""What a merge will cost before it runs: memory per stage and forward passes.

The dominant terms are known from the spec alone: every observed space holds float64
moments of its N*n stacked units, O((N*n)^2), from the statistics to the end of the
sweeps (as its activation similarity), and every weight sweep works on (N*n)^2 float64
similarities.  The forward activations are sized by one pass over two examples with
hooks (not a calibration pass) and scaled to the batch size.  ``merge_models`` checks the
estimate against the free memory of the merge device before any calibration pass
(:func:`check_memory`); ``mudsc merge --dry-run`` prints it (:mod:`mudsc.cli.dry_run`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mudsc.cache import CACHE_SHARE
from mudsc.errors import ResourceError
from mudsc.layers import prefers_channels_last
from mudsc.memory import available_bytes
from mudsc.methods import METHODS, Method
from mudsc.modes import eval_mode
from mudsc.renorm import resolve_mode
from mudsc.spaces import MergeSpec
from mudsc.spaces.taps import select_taps
from mudsc.stats import CHUNK_ROWS

if TYPE_CHECKING:
    from mudsc.merge import MergeConfig

log = logging.getLogger(__name__)

F64, F32 = 8, 4
WORKING_COPIES = 6
"""(N*n)^2 float64 temporaries of the space being solved: the weight parts, their sum,
the correlation, the blend with the activations and the solver's symmetrised copy."""


@dataclass(frozen=True)
class SpaceSize:
    """One mergeable space: its units per model, groups, and N*n stacked units."""

    name: str
    size: int
    groups: int
    stacked: int
    observed: bool

    @property
    def matrix_bytes(self) -> int:
        """One (N*n)^2 float64 matrix (moments, a similarity)."""
        return self.stacked * self.stacked * F64


@dataclass(frozen=True)
class MergeEstimate:
    """Estimated bytes per stage above the resident sources, and forward passes."""

    method: str
    n_models: int
    device: str
    spaces: tuple[SpaceSize, ...]
    source_bytes: int
    stages: dict[str, int]
    passes: dict[str, int]
    batches: int
    examples: int
    notes: tuple[str, ...] = field(default=())

    @property
    def peak_bytes(self) -> int:
        """The largest stage: what the merge needs on top of the loaded sources."""
        return max(self.stages.values(), default=0)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.__getitem__) if self.stages else "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_models": self.n_models,
            "device": self.device,
            "spaces": [vars(s) | {"matrix_bytes": s.matrix_bytes} for s in self.spaces],
            "source_bytes": self.source_bytes,
            "stages_bytes": dict(self.stages),
            "peak_bytes": self.peak_bytes,
            "peak_stage": self.peak_stage,
            "forward_passes": dict(self.passes),
            "batches": self.batches,
            "examples": self.examples,
            "notes": list(self.notes),
        }


def human(n: float) -> str:
    """Bytes as KiB below a MiB, MiB below a GiB, else GiB."""
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


# --- forward sizing ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Sizing:
    """Per example: the largest module output (bytes) and the tapped features (bytes)."""

    largest_output: float
    tapped: dict[str, float]


def _bytes_of(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_bytes_of(v) for v in value)
    if isinstance(value, dict):
        return sum(_bytes_of(v) for v in value.values())
    return 0


def _tap_bytes(x: Any, axis: int, units: int) -> int:
    """The float32 features a tap keeps: every position but the unit axis, times units."""
    if not isinstance(x, Tensor) or x.dim() == 0:
        return 0
    return x.numel() // max(x.shape[axis % x.dim()], 1) * units * F32


@contextmanager
def _hooks(model: nn.Module, spec: MergeSpec, sizes: dict[str, float]) -> Iterator[None]:
    """Record the largest leaf-module output and every space's tapped bytes in ``sizes``."""
    with ExitStack() as stack:
        for module in model.modules():
            if next(module.children(), None) is None:
                h = module.register_forward_hook(
                    lambda _m, _a, out: sizes.__setitem__("", max(sizes.get("", 0), _bytes_of(out)))
                )
                stack.callback(h.remove)
        for space in spec.mergeable:
            for tap in space.taps:
                try:
                    module = model.get_submodule(tap.module)
                except AttributeError:
                    continue  # the statistics stage names the missing module
                n = space.size * tap.inner

                def add(x: Any, key: str = space.name, axis: int = tap.axis, n: int = n) -> None:
                    sizes[key] = sizes.get(key, 0) + _tap_bytes(x, axis, n)

                if tap.side == "input":
                    h = module.register_forward_pre_hook(
                        lambda _m, args, add=add, arg=tap.arg: add(
                            args[arg] if arg < len(args) else None
                        )
                    )
                else:
                    h = module.register_forward_hook(
                        lambda _m, _a, out, add=add, arg=tap.arg: add(
                            out[arg] if isinstance(out, (tuple, list)) else out
                        )
                    )
                stack.callback(h.remove)
        yield


@torch.no_grad()
def size_forward(model: nn.Module, spec: MergeSpec, example: Tensor) -> _Sizing:
    """One forward on ``example`` (eval mode, modes restored) sized per example."""
    sizes: dict[str, float] = {}
    with _hooks(model, spec, sizes), eval_mode(model):
        model(example)
    count = max(len(example), 1)
    largest = sizes.pop("", 0) / count
    return _Sizing(largest, {k: v / count for k, v in sizes.items()})


# --- the estimate -----------------------------------------------------------------------


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _space_sizes(spec: MergeSpec, n_models: int, method: Method) -> tuple[SpaceSize, ...]:
    return tuple(
        SpaceSize(
            s.name, s.size, s.groups, n_models * s.size, method.needs_activations and bool(s.taps)
        )  # fmt: skip
        for s in spec.mergeable
    )


def _weight_tensors(spec: MergeSpec) -> dict[str, int]:
    """Per space, how many tensors its weight similarity reads (one cached part each)."""
    return {s.name: len({m.tensor for m in s.producers + s.consumers}) for s in spec.mergeable}


def _largest_tensor(states: dict[str, Tensor]) -> int:
    return max((t.numel() * F32 for t in states.values()), default=0)


def _statistics_bytes(
    spaces: Sequence[SpaceSize], sizing: _Sizing, n_models: int, batch: int
) -> int:
    """Moments, N-1 models' stashed features of one batch, one forward's activations and
    the product chunk of the widest space."""
    observed = [s for s in spaces if s.observed]
    if not observed:
        return 0
    moments = sum(s.matrix_bytes for s in observed)
    stash = (n_models - 1) * batch * sum(sizing.tapped.get(s.name, 0) for s in observed)
    forward = 3 * batch * sizing.largest_output
    chunk = 0
    for s in observed:
        rows = min(CHUNK_ROWS, batch * sizing.tapped.get(s.name, 0) / max(s.size * F32, 1))
        chunk = max(chunk, 2 * rows * s.stacked * F32 + 2 * s.stacked**2 * F32)
    return int(moments + stash + forward + chunk)


def estimate_merge(
    models: Sequence[nn.Module],
    spec: MergeSpec,
    batches: Sequence[Tensor],
    config: MergeConfig,
) -> MergeEstimate:
    """The memory per stage (bytes above the loaded sources) and the forward passes of
    merging ``models`` (one architecture, ``spec`` its traced spec) on ``batches``."""
    method = METHODS[config.method]
    n = len(models)
    spaces = _space_sizes(spec, n, method)
    batch = max((len(b) for b in batches), default=1)
    observed = select_taps(spec, config.taps)  # the taps the statistics pass reads
    sizing = size_forward(models[0], observed, batches[0][:2]) if batches else _Sizing(0, {})
    state = _state_bytes(models[0])
    sims = sum(s.matrix_bytes for s in spaces if s.observed)
    widest = max((s.matrix_bytes for s in spaces), default=0)
    matches = sum(2 * s.stacked * s.size * F64 for s in spaces)
    layout = n * state if prefers_channels_last(models[0]) else 0
    forward = 3 * batch * sizing.largest_output
    stages = {
        "statistics": layout + _statistics_bytes(spaces, sizing, n, batch),
        "similarity": layout + sims + 4 * widest,
        "solve": layout + sims + matches + WORKING_COPIES * widest,
    }
    similarity = method.similarity_record
    if similarity is not None and similarity.weights is not None:
        tensors = _weight_tensors(spec)
        parts = max((tensors[s.name] * s.matrix_bytes for s in spaces), default=0)
        transformed = 3 * n * _largest_tensor(models[0].state_dict())
        stages["sweeps"] = layout + sims + 2 * matches + parts + widest * WORKING_COPIES
        caches = _sweep_caches(spaces, tensors, config.device, held=sims + 2 * matches)
        stages["sweeps"] += transformed + caches
    candidates = _candidates(method, config)
    kept = 2 if len(candidates) > 1 else 1
    stages["apply"] = (
        layout
        + sims
        + matches
        + (kept + 1) * state
        + 2 * n * _largest_tensor(models[0].state_dict())
    )
    stages["repair"] = layout + sims + matches + kept * state + 3 * forward
    return MergeEstimate(
        method=config.method,
        n_models=n,
        device=config.device,
        spaces=spaces,
        source_bytes=n * state,
        stages=stages,
        passes=forward_passes(models[0], method, config, n, len(candidates), len(batches)),
        batches=len(batches),
        examples=sum(len(b) for b in batches),
        notes=_notes(spaces),
    )


def _sweep_caches(
    spaces: Sequence[SpaceSize], tensors: dict[str, int], device: str, held: int
) -> int:
    """What the sweeps' two bounded caches (weight parts per tensor, similarity per space)
    hold when full, each capped at its share of the memory still free when the sweeps
    start (``held`` bytes of similarities and matches are taken by then; mudsc.cache)."""
    free = available_bytes(device)
    cap = None if free is None else int(max(free - held, 0) * CACHE_SHARE)
    parts = sum(tensors[s.name] * s.matrix_bytes for s in spaces)
    sims = sum(s.matrix_bytes for s in spaces)
    return sum(full if cap is None else min(full, cap) for full in (parts, sims))


def _candidates(method: Method, config: MergeConfig) -> list[float | None]:
    from mudsc.merge import alpha_candidates

    return alpha_candidates(method.similarity_record, config)


def forward_passes(
    model: nn.Module,
    method: Method,
    config: MergeConfig,
    n_models: int,
    candidates: int,
    batches: int,
) -> dict[str, float]:
    """Model passes over the calibration data per stage (one model over every batch of
    its set is one pass): statistics (fit set), repair (fit set: with alpha='auto' each
    candidate is repaired on ``alpha_repair_batches`` of the ``batches``, the winner on
    all), alpha scoring (held-out set, when alpha='auto' is scored on agreement)."""
    mode = resolve_mode(config.repair, model)
    repair = {"bn": 1, "repair": n_models + 1}.get(mode, 0)
    trial = 1.0
    if candidates > 1 and config.alpha_repair_batches and batches:
        trial = min(config.alpha_repair_batches, batches) / batches
    repaired = candidates if candidates == 1 or trial == 1.0 else 1 + candidates * trial
    passes = {
        "statistics": n_models if method.needs_activations else 0,
        f"repair ({mode})": round(repair * repaired, 2),
    }
    if candidates > 1:
        passes["alpha scoring"] = (n_models + 1) * candidates
    return passes


def _notes(spaces: Sequence[SpaceSize]) -> tuple[str, ...]:
    if not spaces:
        return ()
    widest = max(spaces, key=lambda s: s.stacked)
    return (f"widest space {widest.name}: {widest.stacked} stacked units, "
            f"{human(widest.matrix_bytes)} per (N*n)^2 float64 matrix",)  # fmt: skip


def check_memory(estimate: MergeEstimate) -> None:
    """Refuse, before any calibration pass, a merge whose estimated peak exceeds the free
    memory of its device (memory_check=False / --no-memory-check overrides)."""
    free = available_bytes(estimate.device)
    if free is None:
        return
    log.info("estimated peak %s (%s); %s free on %s", human(estimate.peak_bytes),
             estimate.peak_stage, human(free), estimate.device)  # fmt: skip
    if estimate.peak_bytes > free:
        raise ResourceError(
            f"this merge needs an estimated {human(estimate.peak_bytes)} more memory "
            f"(peak in {estimate.peak_stage}) but {estimate.device} has {human(free)} free; "
            "use fewer models, smaller calibration batches or a partial merge (stop_at), or "
            "pass --no-memory-check (memory_check=False) if you know better"
        )


def plan_merge(
    models: Sequence[nn.Module],
    data: Sequence[Any] | None,
    config: MergeConfig,
    spec: MergeSpec | None = None,
    example_input: Tensor | None = None,
) -> MergeEstimate:
    """Check and trace as :func:`~mudsc.merge.merge_models` would, then estimate, without
    any calibration pass: the library side of ``mudsc merge --dry-run``."""
    from mudsc.stages import layout_stage, prepare_stage, trace_stage

    method = METHODS[config.method]
    inputs = prepare_stage(models, data, config.method, method.needs_activations,
                           config.repair, config.device, example_input)  # fmt: skip
    traced = trace_stage(inputs.models[0], spec, inputs.example, config.stop_at)
    sources, batches = layout_stage(inputs.models, inputs.batches)
    return estimate_merge(sources, traced.spec, batches, config)
