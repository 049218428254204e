"""Merging: one validated config, one result record, and the pipeline over the stages.

trace -> statistics -> similarity -> solve -> (weight sweeps) -> apply -> repair
(docs/ALGORITHM.md section 5).  A method is a record in :data:`mudsc.methods.METHODS` naming
its similarity and solver; nothing is chosen by substrings of a name or by flags.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from mudsc import __version__
from mudsc.errors import ConfigError, SpecError
from mudsc.estimate import check_memory, estimate_merge
from mudsc.methods import METHODS, Method
from mudsc.precision import check_precision
from mudsc.presets import PRESETS
from mudsc.progress import Progress
from mudsc.renorm import REPAIR_MODES
from mudsc.similarity import ALPHA, Similarity, with_weight_kind
from mudsc.solvers.catalogue import ZIP_A, ZIP_B
from mudsc.solvers.match import Match
from mudsc.spaces import MergeSpec
from mudsc.spaces.taps import TAP_RULES, select_taps
from mudsc.stages import (
    Candidate,
    Traced,
    activation_similarities,
    agreement,
    alpha_search,
    apply_stage,
    break_dead_ties,
    check_holdout_data,
    layout_stage,
    prepare_stage,
    repair_stage,
    split_holdout,
    statistics_stage,
    trace_stage,
)
from mudsc.sweeps import SWEEP_RULES, SweepEngine, SweepLimits
from mudsc.timing import StageTimer

ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
WEIGHT_SIMILARITIES = ("method", "correlation", "inner")
"""``MergeConfig.weight_similarity``: the method's own kind, or one for every method."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class MergeConfig:
    """Every knob of a merge, validated on construction."""

    method: str = field(
        default="mudsc-zip", metadata=_help("merging method, by name (mudsc.methods.METHODS)")
    )
    alpha: float | str = field(default=ALPHA.default, metadata=_help(ALPHA.help))
    alpha_grid: tuple[float, ...] = field(
        default=ALPHA_GRID, metadata=_help("alpha values tried by alpha='auto', each in [0, 1]")
    )
    holdout: float = field(
        default=0.2,
        metadata=_help("share of the calibration batches held out to score alpha='auto'"),
    )
    zip_a: float = field(default=ZIP_A.default, metadata=_help(ZIP_A.help))
    zip_b: float = field(default=ZIP_B.default, metadata=_help(ZIP_B.help))
    max_sweeps: int = field(default=100, metadata=_help("most weight sweeps per alpha"))
    patience: int = field(
        default=5, metadata=_help("weight sweeps without improvement before stopping")
    )
    tolerance: float = field(
        default=1e-9, metadata=_help("smallest gain of the sweep score that counts")
    )
    seed: int = field(default=0, metadata=_help("seed of the weight sweeps' visiting order"))
    repair: str = field(
        default="auto",
        metadata=_help(f"normalisation repair after merging: {', '.join(REPAIR_MODES)}"),
    )
    device: str = field(default="cpu", metadata=_help("torch device the merge runs on"))
    stats_dtype: str = field(
        default="float32",
        metadata=_help("precision of the activation products: float32 or float64"),
    )
    stop_at: str | int | None = field(
        default=None,
        metadata=_help("partial zip: module path or number of spaces to merge, then heads"),
    )
    precision: str = field(
        default="fp32",
        metadata=_help(
            "forward precision of the statistics passes: fp32, bf16 or tf32 (cuda); bf16 "
            "cost 1-6 accuracy points on a Fashion-MNIST pair (docs/BENCHMARKS.md)"
        ),
    )
    memory_check: bool = field(
        default=True,
        metadata=_help("refuse a merge whose estimated peak memory exceeds what is free"),
    )
    taps: str = field(
        default="all",
        metadata=_help(
            "where a space with several taps (a residual stream) is observed: all (every "
            "consumer's input) or last (its last read in graph order, as the authors)"
        ),
    )
    weight_similarity: str = field(
        default="method",
        metadata=_help(
            "weight similarity of the weight sweeps: method (the method's own: inner "
            "products for rebasin, correlation otherwise), correlation or inner"
        ),
    )
    sweep_rule: str = field(
        default="continue",
        metadata=_help(
            "after a weight sweep that does not improve: continue from where it ended, or "
            "restart from the best matching so far (the authors' rule)"
        ),
    )
    preset: str = field(
        default="mudsc",
        metadata=_help(
            "the named preset the settings start from (mudsc.presets.PRESETS); "
            "MergeConfig.from_preset and --preset apply it, explicit values win"
        ),
    )
    alpha_repair_batches: int = field(
        default=1,
        metadata=_help(
            "calibration batches used to repair each alpha candidate before scoring; the "
            "winner is repaired on all of them; 0 = all"
        ),
    )

    def __post_init__(self) -> None:
        METHODS.get(self.method)
        PRESETS.get(self.preset)
        object.__setattr__(self, "alpha", _parse_alpha(self.alpha))
        _check_alpha_grid(self.alpha_grid)
        _check_holdout(self.holdout)
        _check_zip(self.zip_a, self.zip_b)
        for name in ("max_sweeps", "patience"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("alpha_repair_batches", self.alpha_repair_batches, low=0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if not _is_number(self.tolerance) or not 0 <= self.tolerance < math.inf:
            raise ConfigError(f"tolerance must be a finite number >= 0, got {self.tolerance!r}")
        if self.repair not in REPAIR_MODES:
            raise ConfigError(f"unknown repair {self.repair!r}; valid: {', '.join(REPAIR_MODES)}")
        _check_stop_at(self.stop_at)
        if self.stats_dtype not in ("float32", "float64"):
            raise ConfigError("stats_dtype must be 'float32' or 'float64'")
        _check_device(self.device)
        check_precision(self.precision, self.device)
        _check_choice("taps", self.taps, TAP_RULES)
        _check_choice("weight_similarity", self.weight_similarity, WEIGHT_SIMILARITIES)
        _check_choice("sweep_rule", self.sweep_rule, SWEEP_RULES)

    @classmethod
    def from_preset(cls, preset: str = "mudsc", **values: Any) -> MergeConfig:
        """The config of the named preset (:data:`mudsc.presets.PRESETS`), with ``values``
        (any other field) winning over the preset's."""
        _check_options(values)
        return cls(**{**PRESETS.get(preset).values(), **values, "preset": preset})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alpha_grid"] = list(self.alpha_grid)
        return d


def _check_options(values: Mapping[str, Any]) -> None:
    known = {f.name for f in fields(MergeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown merge option(s) {unknown}; valid options: {sorted(known)}")


def _check_choice(name: str, value: object, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_device(device: object) -> None:
    """A device torch can name and compute on (whether it is present is found when the
    models move there); 'meta' tensors hold no values, so a merge there means nothing."""
    try:
        kind = torch.device(device).type  # type: ignore[call-overload]
    except (RuntimeError, TypeError):
        kind = "meta"
    if kind == "meta":
        raise ConfigError(f"device must be a torch device such as 'cpu' or 'cuda:0', "
                          f"got {device!r}")  # fmt: skip


def _parse_alpha(alpha: float | str) -> float | str:
    """A number in [0, 1] (text is parsed) or 'auto'."""
    value: object = alpha
    if isinstance(alpha, str):
        if alpha == "auto":
            return alpha
        try:
            value = float(alpha)
        except ValueError:
            value = None
    if not isinstance(value, float | int) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ConfigError(f"alpha must be in [0, 1] or 'auto', got {alpha!r}")
    return value


def _check_alpha_grid(grid: tuple[float, ...]) -> None:
    if not grid or any(not _is_number(a) or not 0.0 <= a <= 1.0 for a in grid):
        raise ConfigError(f"alpha_grid values must lie in [0, 1], got {grid}")


def _check_holdout(holdout: float) -> None:
    if not _is_number(holdout) or not 0.0 < holdout < 1.0:
        raise ConfigError(f"holdout must be a fraction in (0, 1), got {holdout}")


def _check_zip(zip_a: float, zip_b: float) -> None:
    if not _is_number(zip_b) or not 0 <= zip_b <= 1:
        raise ConfigError(f"zip_b (within-model budget share) must be in [0, 1], got {zip_b!r}")
    if not _is_number(zip_a) or not 0 <= zip_a <= 1:  # a = 0 already forbids re-merges
        raise ConfigError(f"zip_a (re-merge damping) must be in [0, 1], got {zip_a!r}")


def _check_stop_at(stop_at: object) -> None:
    if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, (str, int))):
        raise ConfigError(
            f"stop_at must be a module path (str) or a number of spaces (int), got {stop_at!r}"
        )


@dataclass
class MergeResult:
    """The merged model and the record of how it was made (the merge card)."""

    model: nn.Module
    spec: MergeSpec
    matches: dict[str, Match]
    config: MergeConfig
    alpha: float | None
    alpha_scores: dict[float, float] = field(default_factory=dict)
    space_values: dict[str, float] = field(default_factory=dict)
    sweeps: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    calibration_batches: int = 0

    def card(self) -> dict[str, Any]:
        """JSON-ready provenance, written into a merged checkpoint's config.json."""
        return {
            "method": self.config.method,
            "config": self.config.to_dict(),
            "alpha": self.alpha,
            "alpha_scores": {str(k): v for k, v in self.alpha_scores.items()},
            "space_similarity": self.space_values,
            "sweeps": self.sweeps,
            "timings": self.timings,
            "calibration_batches": self.calibration_batches,
            "versions": {"mudsc": __version__, "torch": torch.__version__},
        }


def alpha_candidates(similarity: Similarity | None, cfg: MergeConfig) -> list[float | None]:
    """The weight shares to sweep at: none without weight similarity, 1 without a blend,
    the grid for alpha='auto', else the configured alpha."""
    if similarity is None or similarity.weights is None:
        return [None]
    if not similarity.uses_alpha:
        return [1.0]
    if cfg.alpha == "auto":
        return list(cfg.alpha_grid)
    return [float(cfg.alpha)]


def method_similarity(method: Method, cfg: MergeConfig) -> Similarity | None:
    """The similarity ``method`` computes under ``cfg``: its own, reading the configured
    kind of weight similarity where it reads one (``cfg.weight_similarity``)."""
    similarity = method.similarity_record
    if similarity is None or cfg.weight_similarity == "method":
        return similarity
    return with_weight_kind(similarity, cfg.weight_similarity)  # type: ignore[arg-type]


def solver_params(method: Method, cfg: MergeConfig) -> dict[str, float]:
    """The solver's declared parameters, from the config's field of the same name (a
    parameter the config has no field for keeps its declared default)."""
    return {p.name: getattr(cfg, p.name, p.default) for p in method.solver_record.params}


def merge_models(
    models: Sequence[nn.Module],
    data: Iterable[Any] | None = None,
    config: MergeConfig | None = None,
    spec: MergeSpec | None = None,
    score_fn: Callable[[MergeResult], float] | None = None,
    example_input: Tensor | None = None,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge ``models`` and return the model with its full record (see :func:`merge`).

    With ``alpha="auto"``, ``score_fn`` receives each grid point's candidate result (model,
    matches, spec, alpha) and returns a score to maximise; one trace and one statistics pass
    serve the whole grid.  A candidate is repaired on the first ``alpha_repair_batches``
    calibration batches only; the winner is then rebuilt from its matches and repaired on
    all of them, so the returned model is the single-alpha merge at the chosen alpha.
    """
    cfg = config or MergeConfig()
    if not isinstance(cfg, MergeConfig):
        raise ConfigError(f"config must be a MergeConfig (e.g. MergeConfig(method='zipit')), "
                          f"got a {type(cfg).__name__}")  # fmt: skip
    if spec is not None and not isinstance(spec, MergeSpec):
        raise SpecError(f"spec must be a MergeSpec (mudsc.trace or MergeSpec.from_json), got a "
                        f"{type(spec).__name__}")  # fmt: skip
    method = METHODS[cfg.method]
    inputs = prepare_stage(
        models, data, cfg.method, method.needs_activations, cfg.repair, cfg.device, example_input
    )
    held_out = method.uses_alpha and cfg.alpha == "auto" and score_fn is None
    if held_out:
        check_holdout_data(inputs.batches)
    timer = StageTimer()
    with timer.stage("trace"):
        traced = trace_stage(inputs.models[0], spec, inputs.example, cfg.stop_at)
    sources, batches = layout_stage(inputs.models, inputs.batches)
    if cfg.memory_check:
        check_memory(estimate_merge(sources, traced.spec, batches, cfg))
    fit, held = split_holdout(batches, cfg.holdout) if held_out else (batches, [])
    s_act: dict[str, Tensor] = {}
    if method.needs_activations:
        with timer.stage("statistics"):
            observed = select_taps(traced.spec, cfg.taps)
            moments = statistics_stage(
                sources, observed, fit, cfg.device, cfg.stats_dtype, progress, cfg.precision
            )
            s_act = activation_similarities(moments)
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in sources]
    similarity = method_similarity(method, cfg)
    engine = SweepEngine(
        traced.spec, states, similarity, method.solver_record, solver_params(method, cfg),
        s_act, timer, progress,
    )  # fmt: skip
    with timer.stage("solve"):
        start = break_dead_ties(engine, engine.initial())
    run = _Candidates(cfg, sources, states, traced, fit, held, engine, start, timer, score_fn)
    alphas = alpha_candidates(similarity, cfg)
    best, scores = alpha_search(alphas, run, timer, progress)
    timer.seconds.setdefault("assignment", 0.0)
    return MergeResult(
        model=best.model.to(memory_format=torch.contiguous_format),
        spec=traced.spec,
        matches=dict(best.matches),
        config=replace(cfg),
        alpha=best.alpha,
        alpha_scores=scores,
        space_values={k: float(m.value) for k, m in best.matches.items()},
        sweeps=best.sweeps,
        timings=timer.seconds,
        calibration_batches=len(fit),
    )


@dataclass(frozen=True)
class _Candidates:
    """What the alpha search needs to build a merged model per alpha and score it."""

    cfg: MergeConfig
    sources: Sequence[nn.Module]
    states: Sequence[dict[str, Tensor]]
    traced: Traced
    fit: Sequence[Tensor]
    held: Sequence[Tensor]
    engine: SweepEngine
    start: dict[str, Match]
    timer: StageTimer
    score_fn: Callable[[MergeResult], float] | None

    def build(self, alpha: float | None, trial: bool = False) -> Candidate:
        """Sweep at ``alpha`` (none without weight similarity), apply, repair: on every fit
        batch, or on the first ``alpha_repair_batches`` of them for a ``trial``."""
        cfg, matches, sweeps = self.cfg, self.start, 0
        if alpha is not None:
            with self.timer.stage("sweeps"):
                limits = SweepLimits(cfg.max_sweeps, cfg.patience, cfg.tolerance, cfg.seed,
                                     cfg.sweep_rule)  # fmt: skip
                matches, sweeps = self.engine.sweep(self.start, alpha, limits)
        batches = self._trial_batches() if trial else self.fit
        return self._assemble(alpha, matches, sweeps, batches)

    def finish(self, candidate: Candidate) -> Candidate:
        """The winning trial repaired on every fit batch.  Its matches are applied afresh
        (REPAIR folded the trial's correction into its weights), so the result is the
        single-alpha merge at its alpha; a trial that saw every batch is already that."""
        if len(self._trial_batches()) == len(self.fit):
            return candidate
        return self._assemble(candidate.alpha, candidate.matches, candidate.sweeps, self.fit)

    def _trial_batches(self) -> Sequence[Tensor]:
        k = self.cfg.alpha_repair_batches
        return self.fit[:k] if k else self.fit

    def _assemble(
        self, alpha: float | None, matches: dict[str, Match], sweeps: int, batches: Sequence[Tensor]
    ) -> Candidate:
        """``matches`` applied to the sources, repaired on ``batches``."""
        cfg, timer = self.cfg, self.timer
        with timer.stage("apply"):
            merged = apply_stage(self.sources, self.states, self.traced, matches, cfg.stop_at)
        with timer.stage("repair"):
            repair_stage(merged, self.sources, self.traced, matches, batches, cfg.repair,
                         cfg.device)  # fmt: skip
        return Candidate(alpha, matches, sweeps, merged)

    def score(self, candidate: Candidate) -> float:
        """The user's score of the candidate result, or its agreement with the sources on
        the held-out batches."""
        if self.score_fn is None:
            return agreement(candidate.model, self.sources, self.held)
        result = MergeResult(candidate.model, self.traced.spec, dict(candidate.matches),
                             self.cfg, candidate.alpha, sweeps=candidate.sweeps)  # fmt: skip
        return self.score_fn(result)


def merge(
    models: Sequence[nn.Module],
    data: Iterable[Any] | None = None,
    method: str = "mudsc-zip",
    *,
    spec: MergeSpec | None = None,
    score_fn: Callable[[MergeResult], float] | None = None,
    example_input: Tensor | None = None,
    **config: Any,
) -> nn.Module:
    """Merge N >= 2 models of one architecture into one model of the same class and widths.

    ``data`` is an iterable of input batches (labels unused); ``method`` is a name in
    :data:`mudsc.methods.METHODS`; every other keyword is a :class:`MergeConfig` field
    (``alpha`` may be ``"auto"``; ``preset`` names a preset of :data:`mudsc.presets.PRESETS`
    whose values the other keywords override).  Returns the merged model; use
    :func:`merge_models` for the record.
    """
    cfg = MergeConfig.from_preset(**{**config, "method": method})
    return merge_models(models, data, cfg, spec, score_fn, example_input).model
