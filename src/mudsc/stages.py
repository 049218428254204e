"""The merge pipeline's stages, each a function from plain values to a plain value.

    prepare -> trace -> layout -> statistics -> similarity -> solve / weight sweeps
    (mudsc.sweeps) -> apply -> repair

``mudsc.merge.merge_models`` strings them together and times each with one
:class:`~mudsc.timing.StageTimer`.  The calls into the tracer, partial merging and repair
live here, one stage each, so that a stage can be swapped, cached or run elsewhere
without touching the others.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mudsc import distributed
from mudsc.apply import apply_matches
from mudsc.errors import CheckpointError, ConfigError, DataError, SpecError
from mudsc.evaluate import check_finite_weights, check_input_shape
from mudsc.layers import prefers_channels_last
from mudsc.modes import eval_mode
from mudsc.partial import PartialMerge, build_partial, resolve_stop, trunk_spaces
from mudsc.precision import forward_precision
from mudsc.progress import Progress, tracked
from mudsc.renorm import apply_repair, reset_batchnorm, resolve_mode
from mudsc.similarity import WeightSimilarity, activation_similarity, dead_units, with_dead_ties
from mudsc.solvers.match import Match
from mudsc.spaces import MergeSpec, TracedModel, trace_model
from mudsc.spaces.verify import verify_spec
from mudsc.stats import SpaceMoments, collect_moments, shuffled_spaces
from mudsc.sweeps import SweepEngine, solve_group
from mudsc.timing import StageTimer

log = logging.getLogger(__name__)

StopAt = str | int | None


# --- prepare: input checks, data, devices -----------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """The sources on the merge device, the calibration batches and a tracing input."""

    models: list[nn.Module]
    batches: list[Tensor]
    example: Tensor


def check_models(models: Sequence[nn.Module]) -> None:
    """Same architecture, same shapes, finite weights: fail before any work."""
    if len(models) < 2:
        raise ConfigError(f"merging needs at least two models, got {len(models)}")
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model {i} is of type {type(model).__name__}, not a torch.nn.Module; "
                "load it first (mudsc.load_checkpoint or your own code)"
            )
    ref_type = type(models[0])
    ref = models[0].state_dict()
    for i, model in enumerate(models):
        if type(model) is not ref_type:
            raise CheckpointError(
                f"model {i} is a {type(model).__name__} but model 0 is a {ref_type.__name__}; "
                "merge models of one architecture"
            )
        _check_same_tensors(i, model.state_dict(), ref)
        check_finite_weights(model, f"model {i}")


def _check_same_tensors(i: int, state: Mapping[str, Tensor], ref: Mapping[str, Tensor]) -> None:
    for key, t in ref.items():
        other = state.get(key)
        if other is None:
            raise CheckpointError(f"model {i} has no tensor {key!r} (model 0 has it)")
        if other.shape != t.shape:
            raise CheckpointError(
                f"tensor {key!r} has shape {tuple(other.shape)} in model {i} but "
                f"{tuple(t.shape)} in model 0; merge models of the same widths"
            )
    extra = set(state) - set(ref)
    if extra:
        raise CheckpointError(f"model {i} has tensors model 0 lacks, e.g. {sorted(extra)[0]!r}")


def materialise(data: Iterable[Any] | None) -> list[Tensor]:
    """The input tensors of ``data`` (labels dropped, empty batches skipped)."""
    if data is None:
        return []
    batches = []
    for b in data:
        if isinstance(b, (tuple, list)) and not b:
            raise DataError("a calibration batch is an empty tuple; give tensors, or "
                            "(inputs, labels) pairs")  # fmt: skip
        x = b[0] if isinstance(b, (tuple, list)) else b
        if not isinstance(x, Tensor):
            raise DataError(f"calibration batches must be tensors, got {type(x).__name__}")
        if len(x):
            batches.append(x)
    return batches


def prepare_stage(
    models: Sequence[nn.Module],
    data: Iterable[Any] | None,
    method: str,
    needs_activations: bool,
    repair_mode: str,
    device: str,
    example_input: Tensor | None,
) -> Inputs:
    """Check the sources and the data, and put everything on ``device`` (the sources are
    copied there only if they are elsewhere)."""
    models = list(models)
    check_models(models)
    batches = materialise(data)
    mode = resolve_mode(repair_mode, models[0])
    if (needs_activations or mode != "none") and not batches:
        raise DataError(
            f"method {method!r} (repair {mode!r}) needs calibration data, but the data "
            "iterable is empty; pass input batches (or repair='none' for weight-only methods)"
        )
    if example_input is None:
        if not batches:
            raise ConfigError("pass example_input (or calibration data) so the model can be traced")
        example_input = batches[0][:2]
    for x in (example_input, *batches):
        check_input_shape(models[0], x, "the calibration inputs")
    dev = torch.device(device)
    return Inputs(
        [m if _on(m, dev) else copy.deepcopy(m).to(dev) for m in models],
        [b.to(dev) for b in batches],
        example_input.to(dev),
    )


def _on(model: nn.Module, device: torch.device) -> bool:
    p = next(iter(model.parameters()), None)
    return (
        p is None
        or p.device.type == device.type
        and (device.index is None or p.device.index == device.index)
    )


# --- trace -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Traced:
    """``spec``: the spaces to merge (past ``stop_at`` they are fixed); ``full``: the spec as
    traced or given; ``graph``: the trace result that a partial merge cuts (None when a given
    spec needs no graph); ``partial``: whether the merge stops inside the model."""

    spec: MergeSpec
    full: MergeSpec
    graph: TracedModel | None
    partial: bool


def trace_stage(
    model: nn.Module, spec: MergeSpec | None, example: Tensor, stop_at: StopAt
) -> Traced:
    """Trace (unless a spec is given and no cut is asked for), check the spec against the
    model, cut at ``stop_at``.  The model is traced at most once."""
    graph = None
    if spec is None or stop_at is not None:
        graph = trace_model(model, example, verify=spec is None)
    full = graph.spec if spec is None else spec
    full.validate(model)
    if spec is not None:
        check_hand_spec(model, spec, example)
    merged = full
    if stop_at is not None:
        _check_cuttable(graph, example)
        trunk = set(trunk_spaces(full, resolve_stop(graph, stop_at, full)))
        merged = replace(
            full,
            spaces=tuple(
                s if s.fixed or s.name in trunk else replace(s, fixed=True) for s in full.spaces
            ),
        )
    for w in merged.warnings:
        log.warning("spec: %s", w)
    return Traced(merged, full, graph, stop_at is not None)


def _check_cuttable(graph: TracedModel | None, example: Tensor) -> None:
    """A partial merge runs the traced graph itself; a torch.export graph may have the
    example's batch size built in (a reshape to a fixed shape), so try it on another
    batch size and refuse before any work rather than fail at the first real batch."""
    if graph is None or graph.route != "export":
        return
    try:
        with torch.no_grad():
            graph.graph(torch.cat([example, example]))
    except Exception as exc:  # any failure means the cut graph is not usable
        raise SpecError(
            f"partial merges (stop_at) of this model are not available: it was captured "
            f"with torch.export, and its graph only runs at the example's batch size "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); merge the whole model "
            "instead (no stop_at)"
        ) from exc


def check_hand_spec(model: nn.Module, spec: MergeSpec, example: Tensor) -> None:
    """Run the tracer's numeric self-check on a given spec and refuse a wrong one.

    Tracing fixes the spaces that fail the check (its rules are ours); a hand spec is the
    user's, so a space that breaks the model when permuted is refused by name instead.
    """
    checked = verify_spec(model, spec, (example,))
    if checked is spec:
        return
    wrong = [a.name for a, b in zip(spec.spaces, checked.spaces, strict=True) if b.fixed > a.fixed]
    if not wrong:
        for w in checked.warnings[len(spec.warnings) :]:
            log.warning("spec: %s", w)
        return
    raise SpecError(
        f"the given spec is wrong for this model: permuting space(s) {', '.join(wrong)} "
        "changes its output (a member is missing, or an output space is not marked fixed); "
        "mark them fixed, add the missing members, or let mudsc trace the model (spec=None)"
    )


# --- layout ----------------------------------------------------------------------------


def layout_stage(
    models: Sequence[nn.Module], batches: Sequence[Tensor]
) -> tuple[list[nn.Module], list[Tensor]]:
    """Sources whose layer types prefer it run channels-last (copies): oneDNN 2-D
    convolutions run markedly faster on NHWC (measured 1.7x for ResNet-20 x8)."""
    if not prefers_channels_last(models[0]):
        return list(models), list(batches)
    models = [copy.deepcopy(m).to(memory_format=torch.channels_last) for m in models]
    batches = [b.contiguous(memory_format=torch.channels_last) if b.dim() == 4 else b
               for b in batches]  # fmt: skip
    return models, batches


def check_holdout_data(batches: Sequence[Tensor]) -> None:
    """alpha='auto' without a score function needs one sample to fit on and one to score."""
    if sum(len(b) for b in batches) < 2:
        raise DataError(
            "alpha='auto' scores each alpha on held-out calibration inputs, so it needs at "
            "least 2 of them; give more calibration data or a fixed alpha"
        )


def split_holdout(batches: list[Tensor], fraction: float) -> tuple[list[Tensor], list[Tensor]]:
    """Held-out slice for scoring alpha: the last batches (or half of a single batch)."""
    check_holdout_data(batches)
    if len(batches) == 1:
        x = batches[0]
        cut = max(1, int(len(x) * (1 - fraction)))
        return [x[:cut]], [x[cut:]]
    k = min(len(batches) - 1, max(1, round(len(batches) * fraction)))
    return batches[:-k], batches[-k:]


# --- statistics and activation similarity -----------------------------------------------


def statistics_stage(
    models: Sequence[nn.Module],
    spec: MergeSpec,
    batches: Sequence[Tensor],
    device: str,
    dtype: str,
    progress: Progress | None = None,
    precision: str = "fp32",
) -> dict[str, SpaceMoments]:
    """Activation moments of every mergeable space that has taps (the others are matched
    on weights alone); the forward passes run in ``precision`` (mudsc.precision).  Fewer
    than 2 samples are refused (no variance exists); too few to estimate a space's
    correlations are warned about (:func:`warn_thin_statistics`)."""
    samples = sum(len(b) for b in batches)
    if samples < 2:
        raise DataError(
            f"activation statistics need at least 2 calibration samples (variance is undefined "
            f"for {samples}); give more calibration data or a weight-only method"
        )
    tapped = [s.name for s in spec.mergeable if s.taps]
    missing = [s.name for s in spec.mergeable if not s.taps]
    if missing:
        log.warning("spaces without taps use weight similarity only: %s", missing)
    shuffled = shuffled_spaces(models[0], spec, batches[0][:2], tapped)
    if shuffled:
        log.warning(
            "spaces observed over axes that other merge spaces permute (their statistics do "
            "not pair across models) use weight similarity only: %s",
            shuffled,
        )
        tapped = [name for name in tapped if name not in shuffled]
    with forward_precision(precision, device):
        moments = collect_moments(
            models,
            spec,
            tracked(batches, "statistics", progress),
            torch.device(device),
            spaces=tapped,
            dtype=torch.float64 if dtype == "float64" else torch.float32,
        )
    warn_thin_statistics(moments, samples)
    return moments


def warn_thin_statistics(moments: Mapping[str, SpaceMoments], samples: int) -> None:
    """Warn (one line) when a space saw too few rows for its correlation matrix.

    The stacked features of a space are ``w`` wide (N models x n units); their sample
    covariance from ``r`` rows has rank at most ``r - 1``, so ``r <= w`` leaves the
    correlations rank-deficient and the matching partly arbitrary.  A space sees a fixed
    number of rows per sample (1 after pooling, H x W for a conv map), so the advisable
    sample count scales each short space's ``w + 1`` by its rows per sample.
    """
    short = {name: m for name, m in moments.items() if m.count <= m.sum.shape[0]}
    if not short:
        return
    need = {name: math.ceil((m.sum.shape[0] + 1) * samples / m.count) for name, m in short.items()}
    worst = max(need, key=need.__getitem__)
    log.warning(
        "%d calibration samples are too few to estimate activation correlations in %d of %d "
        "spaces (e.g. %s: %d rows for %d stacked units, a rank-deficient estimate); "
        "%d or more samples are advisable",
        samples, len(short), len(moments), worst, short[worst].count,
        short[worst].sum.shape[0], need[worst],
    )  # fmt: skip


def activation_similarities(moments: dict[str, SpaceMoments]) -> dict[str, Tensor]:
    """The similarity of every space; ``moments`` is emptied as it goes (each space's
    (N*n)^2 moments are freed once converted, so the two are never all held at once)."""
    return {name: activation_similarity(moments.pop(name)) for name in list(moments)}


# --- dead-unit ties ----------------------------------------------------------------------


def break_dead_ties(engine: SweepEngine, start: Mapping[str, Match]) -> dict[str, Match]:
    """Re-solve the spaces with dead units, their dead-by-dead similarities taken from the
    weights (:func:`~mudsc.similarity.with_dead_ties`), for methods that never look at
    weights (act-align, zipit).  A space without dead units keeps its match bit for bit.

    The weight similarity of a space depends on its neighbours' matches, so the spaces
    are re-solved in rounds until no match moves (dead neighbours settle in turn).
    """
    matches = dict(start)
    similarity = engine.similarity
    if similarity is None or not similarity.activations or similarity.weights is not None:
        return matches
    dead = {name for name, act in engine.s_act.items() if dead_units(act).any()}
    groups = [g for g in engine.groups if any(sp.name in dead for sp in g)]
    if not groups:
        return matches
    log.info("dead units in %s: paired by weight similarity", ", ".join(sorted(dead)))
    weights = WeightSimilarity(engine.spec, engine.states, "correlation")
    for _ in range(len(groups) + 1):
        moved = False
        for group in groups:
            sims = [
                with_dead_ties(engine.s_act[sp.name], weights(sp.name, matches))
                if sp.name in dead
                else engine.space_similarity(sp, matches, 0.0)
                for sp in group
            ]
            solved = solve_group(group, sims, engine.n, engine.solver, engine.params)
            for sp, match in zip(group, solved, strict=True):
                moved = moved or not torch.equal(match.unmerge, matches[sp.name].unmerge)
                matches[sp.name] = match
        if not moved:
            break
    return matches


# --- apply and repair --------------------------------------------------------------------


def apply_stage(
    models: Sequence[nn.Module],
    states: Sequence[Mapping[str, Tensor]],
    traced: Traced,
    matches: Mapping[str, Match],
    stop_at: StopAt,
) -> nn.Module:
    """The merged model (in eval mode): the sources' class with merged weights, or trunk +
    heads for a partial merge."""
    matches = distributed.agreed(matches)
    if traced.partial:
        assert traced.graph is not None
        merged = build_partial(models, traced.graph, matches, stop_at, traced.full)
    else:
        merged = copy.deepcopy(models[0])
        merged.load_state_dict(apply_matches(traced.spec, states, matches))
    return merged.eval()


def repair_stage(
    merged: nn.Module,
    models: Sequence[nn.Module],
    traced: Traced,
    matches: Mapping[str, Match],
    batches: Sequence[Tensor],
    mode: str,
    device: str,
) -> None:
    """Correct the merged model's normalisation in place: BatchNorm reset or REPAIR."""
    matches = distributed.agreed(matches)
    mode = resolve_mode(mode, merged)
    if mode == "repair" and traced.partial:
        log.warning("REPAIR is not available for partial merges; normalisation left as is")
        mode = "none"
    if mode == "bn":
        reset_batchnorm(merged, batches, device)
    elif mode == "repair":
        apply_repair(merged, models, traced.spec, matches, batches, device)


# --- alpha search --------------------------------------------------------------------------


@dataclass
class Candidate:
    """One merged model of the alpha search, with the matches it was built from."""

    alpha: float | None
    matches: dict[str, Match]
    sweeps: int
    model: nn.Module


PREFERRED_OUTPUTS = ("logits", "last_hidden_state")


def output_features(output: Any) -> Tensor:
    """A model's output as one (batch, features) tensor to compare by cosine.

    Models return a tensor, a tuple, a dict or a Hugging Face ModelOutput (a dict with
    attributes).  A named prediction (``logits``, else ``last_hidden_state``) is what the
    model is for; other outputs (attentions, hidden states) would only dilute it.  Without
    one, every floating tensor leaf counts, each flattened per example, in order.
    """
    if isinstance(output, Tensor):
        return output.flatten(1)
    if isinstance(output, Mapping):
        for key in PREFERRED_OUTPUTS:
            if isinstance(output.get(key), Tensor):
                return output[key].flatten(1)
    leaves = [t.flatten(1) for t in _float_leaves(output)]
    if not leaves:
        raise ConfigError(
            f"alpha='auto' found no floating tensor in the model's output "
            f"({type(output).__name__}); pass a score function (score_fn) to rate candidates"
        )
    return torch.cat(leaves, dim=1)


def _float_leaves(value: Any) -> list[Tensor]:
    """The floating tensors of a nested tuple / list / dict, in order."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, tuple | list):
        return [t for v in value for t in _float_leaves(v)]
    return []


@torch.no_grad()
def agreement(merged: nn.Module, sources: Sequence[nn.Module], batches: Sequence[Tensor]) -> float:
    """How closely the merged model reproduces every source's outputs (mean cosine).

    Sources run in eval mode (modes restored after): in train mode BatchNorm would score
    on batch statistics and overwrite the caller's running statistics.  Inside a process
    group each rank scores its share of the batches and the sums are added.
    """
    total, count = 0.0, 0
    with eval_mode(*sources), distributed.guard():
        for x in distributed.shard(batches):
            outs = (
                merged.forward_heads(x)
                if isinstance(merged, PartialMerge)
                else [merged(x)] * len(sources)
            )
            for out, src in zip(outs, sources, strict=True):
                cos = torch.nn.functional.cosine_similarity(
                    output_features(out), output_features(src(x)), dim=1
                )
                total += cos.sum().item()
                count += len(x)
    total, count = distributed.sum_values(total, count)
    return total / max(count, 1)


class CandidateBuilder(Protocol):
    """What the alpha search needs: candidates built per alpha (cheaply repaired when a
    ``trial``), a score, and the winning trial completed."""

    def build(self, alpha: float | None, trial: bool = False) -> Candidate: ...

    def score(self, candidate: Candidate) -> float: ...

    def finish(self, candidate: Candidate) -> Candidate: ...


def alpha_search(
    alphas: Sequence[float | None],
    builder: CandidateBuilder,
    timer: StageTimer,
    progress: Progress | None = None,
) -> tuple[Candidate, dict[float, float]]:
    """Build a trial candidate per alpha, keep the best scoring one and finish it (a single
    alpha is built in full and not scored).  Returns it with every alpha's score.  A trial
    is repaired on a few calibration batches only: the issue's budget is one statistics
    pass plus cheap scoring per grid point, and the full repair is spent on the winner."""
    if len(alphas) == 1:
        return builder.build(alphas[0]), {}
    scores: dict[float, float] = {}
    best: Candidate | None = None
    best_value = 0.0
    for alpha in alphas:
        candidate = builder.build(alpha, trial=True)
        with timer.stage("alpha search"):
            candidate.model.eval()
            value = builder.score(candidate)
        scores[float(alpha)] = float(value)
        log.info("alpha %.2f: score %.4f", alpha, value)
        if progress:
            progress("alpha search", len(scores), len(alphas))
        if best is None or value > best_value:
            best, best_value = candidate, value
    assert best is not None
    return builder.finish(best), scores
