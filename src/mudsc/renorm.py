"""Renormalisation after merging (docs/ALGORITHM.md section 7): BatchNorm reset and REPAIR.

Averaging matched units shrinks activation variance layer after layer.  BatchNorm
networks re-estimate their running statistics (one cumulative pass); networks without
BatchNorm get REPAIR: every eligible layer's per-channel output mean and std are pulled
to the average of the source units merged into it, and the correction is folded into that
layer's weight and bias so the architecture is unchanged.  Which layers are BatchNorms
and which REPAIR may correct (and along which axis) is their layer type's
(:mod:`mudsc.layers`), the same registration the tracer uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mudsc import distributed
from mudsc.errors import ConfigError, DataError
from mudsc.layers import has_batchnorm, is_batchnorm, layer_type
from mudsc.modes import eval_mode, train_mode
from mudsc.moments import combine
from mudsc.solvers.match import Match
from mudsc.spaces.spec import MergeSpec
from mudsc.stats import batch_fits

log = logging.getLogger(__name__)

REPAIR_MODES = ("auto", "bn", "repair", "none")
_EPS = 1e-5


def resolve_mode(mode: str, model: nn.Module) -> str:
    """``auto`` -> BN reset where the model has BatchNorm, REPAIR otherwise."""
    if mode not in REPAIR_MODES:
        raise ConfigError(f"unknown repair {mode!r}; valid: {', '.join(REPAIR_MODES)}")
    if mode == "auto":
        return "bn" if has_batchnorm(model) else "repair"
    return mode


def _nonempty(batches: Iterable[Tensor]) -> list[Tensor]:
    """The batches as a list; none is an error, raised before any state is touched."""
    batches = list(batches)
    if not batches:
        raise DataError("normalisation repair needs calibration data, but none was given")
    return batches


def _forward_all(model: nn.Module, batches: Iterable[Tensor], device: torch.device | str) -> None:
    """This rank's share of the batches through ``model`` (all of them in one process)."""
    with distributed.guard():
        for k, x in distributed.shard(enumerate(batches)):
            with batch_fits(f"calibration batch {k}"):
                model(x.to(device))


@torch.no_grad()
def reset_batchnorm(
    model: nn.Module, batches: Iterable[Tensor], device: torch.device | str
) -> None:
    """Re-estimate every BatchNorm's running statistics as a cumulative average (one pass);
    the model is left in eval mode, ready to use.  Inside a process group the ranks share
    the batches and combine their averages into the one over all batches."""
    batches = _nonempty(batches)
    norms = [m for m in model.modules() if is_batchnorm(m)]
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    try:
        with train_mode(model):
            _forward_all(model, batches, device)
        distributed.combine_batchnorm(norms)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()


def _channel_axis(module: nn.Module | None) -> str | None:
    """The output axis REPAIR corrects for this module (its layer type's), or None."""
    layer = layer_type(module) if module is not None else None
    return layer.channel_axis if layer is not None else None


def _batch_moments(y: Tensor, channel_last: bool) -> tuple[int, Tensor, Tensor]:
    """Row count, per-channel mean and (biased) variance of one batch's output, in the
    output's dtype, about the batch mean (no cancellation).  Rows x channels sums, not
    ``torch.var_mean``, which is several times slower on the CPU over these shapes."""
    y = y.detach()
    rows = y.movedim(y.dim() - 1 if channel_last else 1, -1).reshape(
        -1, y.shape[-1 if channel_last else 1]
    )
    mean = rows.mean(dim=0)
    centred = rows - mean
    return rows.shape[0], mean, (centred * centred).mean(dim=0)


@dataclass
class _Moments:
    """Per-channel mean and sum of squared deviations of one layer's output over all
    batches, merged batch by batch in float64 (Chan et al.'s parallel formula), and each
    call's own mean and std in order (this rank's batches only: they never leave it)."""

    count: int = 0
    mean: Tensor | None = None
    m2: Tensor | None = None
    calls: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def add(self, count: int, mean: Tensor, var: Tensor) -> None:
        mean, var = mean.double(), var.double()
        self.calls.append((mean, var.clamp_min(0.0).sqrt()))
        m2 = var * count
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total, self.mean, self.m2 = combine(self.count, self.mean, self.m2, count, mean, m2)
        self.count = int(total)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        if self.mean is None or self.m2 is None:
            raise DataError("REPAIR measured no batch; the calibration data is empty")
        return self.mean, (self.m2 / self.count).clamp_min(0.0).sqrt()


def repair_layers(model: nn.Module, spec: MergeSpec) -> dict[str, list[tuple[str, int, int]]]:
    """Layers REPAIR may correct: modules with weight and bias whose output rows lie in
    non-fixed spaces; per layer, the (space, start, size) slices of its output channels."""
    modules = dict(model.named_modules())
    layers: dict[str, list[tuple[str, int, int]]] = {}
    for space in spec.mergeable:
        for member in space.producers:
            path, _, leaf = member.tensor.rpartition(".")
            mod = modules.get(path)
            if leaf != "weight" or member.axis != 0 or member.inner != 1:
                continue
            if _channel_axis(mod) is None or mod.bias is None:
                continue
            layers.setdefault(path, []).append((space.name, member.start, space.size))
    return layers


def _channel_last(mod: nn.Module) -> bool:
    return _channel_axis(mod) == "last"


def _site(modules: Mapping[str, nn.Module], name: str) -> tuple[nn.Module, bool]:
    """Where layer ``name``'s output is observed: the module to hook, and whether its output
    is the first item of a tuple there.  ``nn.MultiheadAttention`` calls its ``out_proj``
    weights functionally (the Linear's own forward never runs) and returns the projection
    as its first output, so that layer is observed at the attention module."""
    path, _, leaf = name.rpartition(".")
    parent = modules.get(path)
    if leaf == "out_proj" and isinstance(parent, nn.MultiheadAttention):
        return parent, True
    return modules[name], False


def _observe(
    modules: Mapping[str, nn.Module], name: str, fn: Callable[[nn.Module, Tensor], Tensor | None]
) -> torch.utils.hooks.RemovableHandle:
    """Hook ``fn(layer, output)`` on layer ``name``'s site; a returned tensor replaces it."""
    layer = modules[name]
    site, first = _site(modules, name)

    def hook(_mod: nn.Module, _inp: object, out: Any) -> Any:
        new = fn(layer, out[0] if first else out)
        if new is None:
            return None
        return (new, *out[1:]) if first else new

    return site.register_forward_hook(hook)


def _measure(
    model: nn.Module,
    layers: Iterable[str],
    batches: Sequence[Tensor],
    device: torch.device | str,
) -> dict[str, _Moments]:
    modules = dict(model.named_modules())
    stats = {name: _Moments() for name in layers}
    handles = [
        _observe(
            modules,
            name,
            lambda mod, out, s=stats[name]: s.add(*_batch_moments(out, _channel_last(mod))),
        )
        for name in stats
    ]
    try:
        with eval_mode(model), torch.no_grad():
            _forward_all(model, batches, device)
    finally:
        for h in handles:
            h.remove()
    return _shared(stats)


def _shared(stats: dict[str, _Moments]) -> dict[str, _Moments]:
    """Every rank's per-channel moments merged (each rank measured a shard of the batches);
    the per-call statistics stay this rank's, as do the batches they belong to."""
    if not distributed.active():
        return stats
    parts = {n: None if s.mean is None else (s.count, s.mean, s.m2) for n, s in stats.items()}
    merged = distributed.combine_parts(parts)
    return {
        n: _Moments(calls=stats[n].calls) if p is None else _Moments(*p, calls=stats[n].calls)
        for n, p in merged.items()
    }


def _called(
    layers: dict[str, list[tuple[str, int, int]]], source_stats: Sequence[dict[str, _Moments]]
) -> dict[str, list[tuple[str, int, int]]]:
    """The layers whose output was seen in every source; the others are left as merged,
    with a log line (a module whose weights its parent uses without calling it)."""
    unseen = sorted(n for n in layers if any(s[n].mean is None for s in source_stats))
    if unseen:
        log.info("REPAIR: %s never ran as a module; left uncorrected", ", ".join(unseen))
    return {n: v for n, v in layers.items() if n not in unseen}


def _targets(
    layer_slices: list[tuple[str, int, int]],
    source_stats: Sequence[tuple[Tensor, Tensor]],
    matches: Mapping[str, Match],
) -> tuple[Tensor, Tensor]:
    """Per merged channel (the last axis; leading axes, such as one row per batch, are
    kept): M-weighted average of the source units' means and stds, computed where the
    statistics are (no per-layer round trip to the CPU on a GPU)."""
    first = source_stats[0][0]
    mean = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    std = torch.zeros_like(mean)
    covered = torch.zeros(first.shape[-1], dtype=torch.bool, device=first.device)
    for space, start, size in layer_slices:
        match, rows = matches[space], slice(start, start + size)
        for i, (mu, sd) in enumerate(source_stats):
            m_i = match.merge_of(i).to(first.device, torch.float64)
            mean[..., rows] += mu[..., rows].double() @ m_i
            std[..., rows] += sd[..., rows].double() @ m_i
        covered[rows] = True
    rest = ~covered
    if rest.any():
        mean[..., rest] = torch.stack([mu.double() for mu, _ in source_stats]).mean(0)[..., rest]
        std[..., rest] = torch.stack([sd.double() for _, sd in source_stats]).mean(0)[..., rest]
    return mean, std


def _call_targets(
    slices: list[tuple[str, int, int]], stats: Sequence[_Moments], matches: Mapping[str, Match]
) -> tuple[Tensor, Tensor]:
    """One layer's targets per call on this rank's batches (calls x channels): the
    M-weighted average of the sources' statistics on that same batch."""
    calls = min(len(s.calls) for s in stats)
    if calls == 0:  # a rank with no batch of its own
        empty = torch.zeros(0, 0, dtype=torch.float64)
        return empty, empty
    per_source = [
        (torch.stack([m for m, _ in s.calls[:calls]]), torch.stack([d for _, d in s.calls[:calls]]))
        for s in stats
    ]
    return _targets(slices, per_source, matches)


@torch.no_grad()
def apply_repair(
    merged: nn.Module,
    sources: Sequence[nn.Module],
    spec: MergeSpec,
    matches: Mapping[str, Match],
    batches: Sequence[Tensor],
    device: torch.device | str,
) -> int:
    """REPAIR: fold per-channel affine corrections into eligible layers; returns their count.

    One pass over the data per source, then one over the merged model, BatchNorm-style (as
    in Jordan et al.): while a layer's raw output is measured it is already corrected, so
    later layers are measured close to how they will run after folding.  Each batch is
    corrected with its own statistics toward the sources' statistics *on that batch*, not
    toward the pooled targets: correcting toward pooled targets erases every batch's own
    deviation from the pool, which later layers then see and the fold cannot undo (a
    permuted copy merged with itself moved by up to 7% with 2-8 batches).  With per-batch
    targets a perfect merge is left unchanged for any number of batches; the fold itself
    takes the merged layer's pooled raw statistics to the pooled targets.
    """
    layers = repair_layers(merged, spec)
    if not layers:
        log.info("REPAIR: no eligible layer (needs weight and bias on a merged space)")
        return 0
    batches = _nonempty(batches)
    source_stats = [_measure(src, layers, batches, device) for src in sources]
    layers = _called(layers, source_stats)
    pooled, per_call = {}, {}
    for name, slices in layers.items():
        stats = [s[name] for s in source_stats]
        mean, std = _targets(slices, [s.mean_std() for s in stats], matches)
        pooled[name] = (mean.to(device), std.to(device))
        per_call[name] = tuple(t.to(device) for t in _call_targets(slices, stats, matches))
    del source_stats
    raw = _correcting_pass(merged, layers, batches, device, pooled, per_call)
    modules = dict(merged.named_modules())
    for name in layers:
        _fold(modules[name], raw[name].mean_std(), pooled[name])
    return len(layers)


Targets = dict[str, tuple[Tensor, Tensor]]


def _correcting_pass(
    merged: nn.Module,
    layers: Iterable[str],
    batches: Sequence[Tensor],
    device: torch.device | str,
    pooled: Targets,
    per_call: Targets,
) -> dict[str, _Moments]:
    """The merged model's raw per-channel moments of every layer, measured while each
    call's output is corrected toward its own call's targets (pooled targets for a call
    the sources never made, which only data-dependent control flow could produce)."""
    modules = dict(merged.named_modules())
    raw = {name: _Moments() for name in layers}

    def correct(name: str, mod: nn.Module, out: Tensor) -> Tensor:
        last = _channel_last(mod)
        count, mean, var = _batch_moments(out, last)
        raw[name].add(count, mean, var)
        call, (means, stds) = len(raw[name].calls) - 1, per_call[name]
        target = (means[call], stds[call]) if call < len(means) else pooled[name]
        # (out - mean) / std * t_std + t_mean as one multiply-add per element
        t_mean, t_std = (t.to(out.dtype) for t in target)
        scale = t_std / var.sqrt().clamp_min(_EPS)
        shift = t_mean - mean * scale
        shape = [1] * out.dim()
        shape[-1 if last else 1] = -1
        return torch.addcmul(shift.view(shape), out, scale.view(shape))

    handles = [
        _observe(modules, name, lambda mod, out, name=name: correct(name, mod, out)) for name in raw
    ]
    merged.eval()
    try:
        _forward_all(merged, batches, device)
    finally:
        for h in handles:
            h.remove()
    return _shared(raw)


def _fold(mod: nn.Module, now: tuple[Tensor, Tensor], target: tuple[Tensor, Tensor]) -> None:
    """Fold the affine map taking the pooled raw statistics ``now`` to ``target`` into the
    layer's weight and bias (a channel with no spread keeps its scale)."""
    now_mean, now_std = (t.cpu() for t in now)
    t_mean, t_std = (t.double().cpu() for t in target)
    scale = torch.where(now_std > _EPS, t_std / now_std.clamp_min(_EPS), torch.ones_like(t_std))
    shift = t_mean - scale * now_mean
    w_shape = (-1,) + (1,) * (mod.weight.dim() - 1)
    mod.weight.mul_(scale.to(mod.weight).view(w_shape))
    mod.bias.mul_(scale.to(mod.bias)).add_(shift.to(mod.bias))
