"""The YAML schema of ``mudsc experiment``: one validated, frozen value per run.

Every key is checked here, before any work starts, so a typo costs seconds rather than a
half-finished run: unknown keys are rejected and each message names the key, what it
must be and, for choices, the valid values.  Config files are untrusted text: they are
size-capped, YAML aliases may not expand past a small node budget (an alias bomb), every
echoed value is cut to ~100 characters, and the finished config is type-checked field by
field against the dataclass annotations, whichever code filled it in.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mudsc.atomic import EXPERIMENT_MARKER
from mudsc.errors import ConfigError, MudscError
from mudsc.inputs import regular_file
from mudsc.merge import ALPHA_GRID, MergeConfig
from mudsc.methods import method_names
from mudsc.models.registry import given, shown
from mudsc.train import TrainConfig

HETERO_TASKS = ("classification", "autoencode", "denoise", "rotation")
ALPHA_SCORES = ("accuracy", "agreement", "loss")
# MergeConfig fields the experiment sets itself (top-level keys, the device, the
# calibration split); every other field may be set under ``merge:``.
RUNNER_MERGE_FIELDS = ("method", "alpha", "alpha_grid", "holdout", "device", "seed", "stop_at")
MAX_CONFIG_BYTES = 1024 * 1024  # shipped configs are ~1 KB
# YAML nodes after expanding every alias: a real config has a few hundred; an alias bomb of
# nine nested levels has billions.
MAX_YAML_NODES = 10_000
MAX_NAME_CHARS = 100
MERGE_KEYS = tuple(f.name for f in fields(MergeConfig) if f.name not in RUNNER_MERGE_FIELDS)
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "seed")


@dataclass(frozen=True)
class Calibration:
    """Calibration images drawn (seeded) from the tasks' training split.

    ``holdout`` is the labelled share kept aside to score ``alpha: auto``; the rest feeds
    every method's statistics, so all methods see the same calibration images.
    """

    size: int = 500
    batch_size: int = 100
    holdout: float = 0.2
    augment: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Variant:
    """One knob setting of a study: the top-level merge settings with some of them changed.

    Its merges are the rows ``METHOD @ NAME`` beside the top level's; the sources, the test
    set and every other setting are shared, so one training serves the whole study.
    ``calibration`` holds only the changed calibration keys.
    """

    name: str
    methods: tuple[str, ...] = ()
    alpha: float | str | None = None
    alpha_grid: tuple[float, ...] | None = None
    alpha_score: str | None = None
    merge: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    stop_at: str | int | None = None


@dataclass(frozen=True)
class MergeSettings:
    """Everything one row's merges depend on beyond the sources: the top level's settings
    (``label`` empty) or a variant's, resolved."""

    label: str
    methods: tuple[str, ...]
    alpha: float | str
    alpha_grid: tuple[float, ...]
    alpha_score: str
    merge: dict[str, Any]
    calibration: Calibration
    stop_at: str | int | None = None

    def row(self, method: str) -> str:
        """The row name of ``method`` merged with these settings."""
        return f"{method} @ {self.label}" if self.label else method


@dataclass(frozen=True)
class HeteroSettings:
    """The heterogeneous-task experiment: which task kinds, which encoder pairs."""

    tasks: tuple[str, ...] = HETERO_TASKS
    task_pairs: tuple[tuple[str, str], ...] = ()
    seeds: tuple[int, ...] = ()
    noise_std: float = 0.5
    keep_heads: bool = True


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment; ``to_dict`` gives the resolved config written beside the results."""

    name: str
    dataset: str
    kind: str = "classification"
    data_dir: str | None = None
    arch: str = "resnet20"
    arch_args: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 512
    head_seed: int = 0
    split: str = "5+5"
    pairs: int = 3
    split_seeds: tuple[int, ...] = ()
    model_seeds: tuple[tuple[int, ...], ...] = ()
    train: TrainConfig = field(default_factory=TrainConfig)
    train_images_per_class: int | None = None
    test_images_per_class: int | None = None
    methods: tuple[str, ...] = ()
    alpha: float | str = "auto"
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    alpha_score: str = "accuracy"
    merge: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration = field(default_factory=Calibration)
    eval_batch_size: int = 500
    output_dir: str = ""
    hetero: HeteroSettings | None = None
    variants: tuple[Variant, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"].pop("seed", None)
        if self.hetero is None:
            d.pop("hetero")
        return d

    def settings(self) -> list[MergeSettings]:
        """The top level's merge settings, then every variant's, resolved."""
        top = MergeSettings(
            "", self.methods, self.alpha, self.alpha_grid, self.alpha_score, dict(self.merge),
            self.calibration,
        )  # fmt: skip
        return [top] + [
            MergeSettings(
                v.name,
                v.methods or self.methods,
                self.alpha if v.alpha is None else v.alpha,
                self.alpha_grid if v.alpha_grid is None else v.alpha_grid,
                v.alpha_score or self.alpha_score,
                {**self.merge, **v.merge},
                dataclasses.replace(self.calibration, **v.calibration),
                v.stop_at,
            )
            for v in self.variants
        ]

    def rows(self) -> list[str]:
        """Every merge row name, in table order."""
        return [s.row(m) for s in self.settings() for m in s.methods]


# --- field checks ----------------------------------------------------------------------


def _fail(key: str, must: str, value: Any) -> ConfigError:
    hint = ""
    if isinstance(value, str) and "e" in value.lower() and _is_number(value):
        hint = " (YAML reads 1e9 and 1.0e9 as text; write 1.0e+9)"
    return ConfigError(f"config key {key!r} must be {must}, got {given(value)}{hint}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _int(key: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, "an integer" if minimum is None else f"an integer >= {minimum}", value)
    if minimum is not None and value < minimum:
        raise _fail(key, f"an integer >= {minimum}", value)
    return value


def _number(key: str, value: Any, low: float, high: float, open_low: bool = False) -> float:
    bracket = "(" if open_low else "["
    must = f"a number in {bracket}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(key, must, value)
    if value > high or value < low or (open_low and value == low):
        raise _fail(key, must, value)
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value)
    return value


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, "a non-empty string", value)
    return value


def _optional(check: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(key: str, value: Any, *args: Any) -> Any:
        return None if value is None else check(key, value, *args)

    return wrapped


def _mapping(key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(key, "a mapping (key: value lines)", value)
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise ConfigError(
            f"unknown config key {shown(f'{key}.{unknown[0]}')}; valid keys under {key!r}: "
            f"{', '.join(allowed)}"
        )
    return dict(value)


def _choice(key: str, value: Any, choices: list[str] | tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(
            f"config key {key!r}: {shown(value)} is not valid; choose one of {', '.join(choices)}"
        )
    return value


def _alpha(value: Any) -> float | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise _fail("alpha", "a number in [0, 1] or 'auto'", value)
    return float(value)


def _int_list(key: str, value: Any, length: int) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) != length:
        raise _fail(key, f"a list of {length} integers", value)
    return tuple(_int(f"{key}[{i}]", v) for i, v in enumerate(value))


# --- sections --------------------------------------------------------------------------


def _train(raw: Any) -> TrainConfig:
    values = _mapping("train", raw, TRAIN_KEYS)
    checks: dict[str, Callable[[str, Any], Any]] = {
        "epochs": lambda k, v: _int(k, v, 1),
        "batch_size": lambda k, v: _int(k, v, 1),
        "lr": lambda k, v: _number(k, v, 0.0, 1e3, open_low=True),
        "momentum": lambda k, v: _number(k, v, 0.0, 0.999),
        "weight_decay": lambda k, v: _number(k, v, 0.0, 1.0),
        "warmup_epochs": lambda k, v: _number(k, v, 0.0, 1e6),
        "augment": _bool,
        "crop_padding": _optional(lambda k, v: _int(k, v, 0)),
    }
    return TrainConfig(**{k: checks[k](f"train.{k}", v) for k, v in values.items()})


def _calibration(raw: Any, key: str = "calibration") -> Calibration:
    values = _calibration_values(raw, key)
    return Calibration(**values)


def _calibration_values(raw: Any, key: str) -> dict[str, Any]:
    keys = tuple(f.name for f in fields(Calibration))
    values = _mapping(key, raw, keys)
    checks: dict[str, Callable[[str, Any], Any]] = {
        "size": lambda k, v: _int(k, v, 2),
        "batch_size": lambda k, v: _int(k, v, 1),
        "holdout": lambda k, v: _number(k, v, 0.0, 0.9, open_low=True),
        "augment": _bool,
        "seed": _int,
    }
    return {k: checks[k](f"{key}.{k}", v) for k, v in values.items()}


def _merge_options(raw: Any, methods: tuple[str, ...], section: str = "merge") -> dict[str, Any]:
    values = _mapping(section, raw, MERGE_KEYS)
    hints = typing.get_type_hints(MergeConfig)
    for key, value in values.items():  # before MergeConfig, whose messages echo values whole
        if not _fits(value, hints[key]):
            raise _fail(f"{section}.{key}", _expected(hints[key]), value)
    for method in methods:
        try:
            MergeConfig.from_preset(method=method, **values)
        except MudscError as exc:
            raise ConfigError(f"config section {section!r}: {exc}") from None
        except TypeError as exc:  # a value of the wrong type inside MergeConfig's checks
            raise ConfigError(f"config section 'merge': a value has a wrong type ({exc})") from None
    return values


VARIANT_KEYS = tuple(f.name for f in fields(Variant))


def _variants(raw: Any, methods: tuple[str, ...]) -> tuple[Variant, ...]:
    """The ``variants`` list: each a name and the top-level settings it changes."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise _fail("variants", "a non-empty list of mappings, each with a 'name'", raw)
    variants = tuple(_variant(f"variants[{i}]", item, methods) for i, item in enumerate(raw))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'variants' names a variant twice: {shown(names)}")
    return variants


def _variant(key: str, raw: Any, methods: tuple[str, ...]) -> Variant:
    values = _mapping(key, raw, VARIANT_KEYS)
    if "name" not in values:
        raise ConfigError(f"config key {key!r} needs a 'name' (the rows read METHOD @ NAME)")
    name = values["name"]
    if not isinstance(name, str) or not name.strip() or "@" in name or len(name) > 40:
        raise _fail(f"{key}.name", "a short non-empty label without '@'", name)
    own = _methods(values["methods"]) if "methods" in values else ()
    return Variant(
        name=name,
        methods=own,
        alpha=None if values.get("alpha") is None else _alpha(values["alpha"]),
        alpha_grid=None if values.get("alpha_grid") is None else _grid(values["alpha_grid"]),
        alpha_score=_optional(_choice)(
            f"{key}.alpha_score", values.get("alpha_score"), ALPHA_SCORES
        ),  # fmt: skip
        merge=_merge_options(values.get("merge"), own or methods, f"{key}.merge"),
        calibration=_calibration_values(values.get("calibration"), f"{key}.calibration"),
        stop_at=_stop_at(f"{key}.stop_at", values.get("stop_at")),
    )


def _stop_at(key: str, value: Any) -> str | int | None:
    """A partial merge's stop point: a module path or a count of spaces >= 1."""
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    return _int(key, value, 1)


def _methods(raw: Any) -> tuple[str, ...]:
    valid = method_names()
    if raw is None:
        return tuple(valid)
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise _fail("methods", f"a non-empty list of {', '.join(valid)}", raw)
    methods = tuple(_choice("methods", m, valid) for m in raw)
    if len(set(methods)) != len(methods):
        raise ConfigError(f"config key 'methods' lists a method twice: {shown(list(methods))}")
    return methods


def _grid(raw: Any) -> tuple[float, ...]:
    if raw is None:
        return ALPHA_GRID
    if not isinstance(raw, list) or not raw:
        raise _fail("alpha_grid", "a non-empty list of numbers in [0, 1]", raw)
    return tuple(_number(f"alpha_grid[{i}]", v, 0.0, 1.0) for i, v in enumerate(raw))


def hetero_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The ``hetero`` kind's keys (:data:`HETERO_KEYS`) as ExperimentConfig fields."""
    return {"hetero": _hetero(raw)}


def _hetero(raw: Mapping[str, Any]) -> HeteroSettings:
    tasks_raw = raw.get("tasks", list(HETERO_TASKS))
    if not isinstance(tasks_raw, list) or len(tasks_raw) < 2:
        raise _fail("tasks", f"a list of at least two of {', '.join(HETERO_TASKS)}", tasks_raw)
    tasks = tuple(_choice("tasks", t, HETERO_TASKS) for t in tasks_raw)
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"config key 'tasks' lists a task twice: {shown(list(tasks))}")
    pairs_raw = raw.get("task_pairs", "all")
    if pairs_raw == "all":
        pairs = tuple((a, b) for i, a in enumerate(tasks) for b in tasks[i + 1 :])
    else:
        if not isinstance(pairs_raw, list) or not pairs_raw:
            raise _fail("task_pairs", "'all' or a list of [task, task] pairs", pairs_raw)
        pairs = []
        for i, pair in enumerate(pairs_raw):
            if not isinstance(pair, list | tuple) or len(pair) != 2 or pair[0] == pair[1]:
                raise _fail(f"task_pairs[{i}]", "two different task names", pair)
            pairs.append(tuple(_choice(f"task_pairs[{i}]", t, tasks) for t in pair))
        pairs = tuple(pairs)
    seeds = raw.get("seeds")
    seeds = (
        tuple(range(1, len(tasks) + 1)) if seeds is None else _int_list("seeds", seeds, len(tasks))
    )
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"config key 'seeds' must give every task its own seed, got {seeds}")
    return HeteroSettings(
        tasks=tasks,
        task_pairs=pairs,  # type: ignore[arg-type]
        seeds=seeds,
        noise_std=_number("noise_std", raw.get("noise_std", 0.5), 0.0, 10.0, open_low=True),
        keep_heads=_bool("keep_heads", raw.get("keep_heads", True)),
    )


_COMMON = (
    "kind", "name", "dataset", "data_dir", "arch", "arch_args", "embed_dim", "train",
    "train_images_per_class", "test_images_per_class", "methods", "alpha", "alpha_grid",
    "merge", "calibration", "eval_batch_size", "output_dir",
)  # fmt: skip
CLASSIFICATION_KEYS = (
    "head_seed", "split", "pairs", "split_seeds", "model_seeds", "alpha_score", "variants",
)  # fmt: skip
HETERO_KEYS = ("tasks", "task_pairs", "seeds", "noise_std", "keep_heads")


def _pairs_and_seeds(raw: Mapping[str, Any]) -> tuple[int, tuple[int, ...], tuple]:
    from mudsc.data import parse_split

    pairs = _int("pairs", raw.get("pairs", 3), 1)
    n_models = len(parse_split(_str("split", raw.get("split", "5+5"))))
    split_seeds = raw.get("split_seeds")
    split_seeds = (
        tuple(range(pairs)) if split_seeds is None else _int_list("split_seeds", split_seeds, pairs)
    )
    seeds = raw.get("model_seeds")
    if seeds is None:
        model_seeds = tuple(
            tuple(1 + k * n_models + i for i in range(n_models)) for k in range(pairs)
        )
    else:
        if not isinstance(seeds, list) or len(seeds) != pairs:
            raise _fail("model_seeds", f"a list of {pairs} lists (one per pair)", seeds)
        model_seeds = tuple(
            _int_list(f"model_seeds[{k}]", s, n_models) for k, s in enumerate(seeds)
        )
    for k, s in enumerate(model_seeds):
        if len(set(s)) != len(s):
            raise ConfigError(
                f"config key 'model_seeds[{k}]' must give each model its own seed, got {list(s)}"
            )
    return pairs, split_seeds, model_seeds


def classification_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The ``classification`` kind's keys (:data:`CLASSIFICATION_KEYS`) as config fields."""
    pairs, split_seeds, model_seeds = _pairs_and_seeds(raw)
    return {
        "alpha_score": _choice("alpha_score", raw.get("alpha_score", "accuracy"), ALPHA_SCORES),
        "variants": _variants(raw.get("variants"), _methods(raw.get("methods"))),
        "head_seed": _int("head_seed", raw.get("head_seed", 0)),
        "split": raw.get("split", "5+5"),
        "pairs": pairs,
        "split_seeds": split_seeds,
        "model_seeds": model_seeds,
    }


def parse_config(
    raw: Any, name: str = "experiment", config_dir: Path | None = None
) -> ExperimentConfig:
    """Validate a parsed YAML mapping into an :class:`ExperimentConfig`.

    ``config_dir``: the folder of the config file, which ``output_dir`` may not be (nor a
    folder above it).
    """
    if not isinstance(raw, Mapping):
        raise ConfigError("an experiment config must be a YAML mapping of keys to values")
    from mudsc.experiments.runner import POOLS  # the runner imports this module

    kind = _choice("kind", raw.get("kind", "classification"), POOLS.names())
    pool = POOLS[kind]
    allowed = _COMMON + pool.keys
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise ConfigError(
            f"unknown config key {shown(unknown[0])} (kind {kind!r}); valid keys: "
            f"{', '.join(allowed)}"
        )
    from mudsc.data import dataset_names

    if raw.get("dataset") is None:
        raise ConfigError(
            f"config key 'dataset' is missing; set it to one of {', '.join(dataset_names())}"
        )
    dataset = _choice("dataset", _str("dataset", raw["dataset"]).strip().lower(), dataset_names())
    values: dict[str, Any] = {
        "name": _name(raw.get("name", name)),
        "kind": kind,
        "dataset": dataset,
        **_model_fields(raw, pool.embed_dim),
        **_run_fields(raw),
    }
    values["output_dir"] = check_output_dir(
        _str("output_dir", raw.get("output_dir", f"runs/{values['name']}")), config_dir
    )
    values.update(pool.fields(raw))
    try:
        cfg = ExperimentConfig(**values)
    except TypeError as exc:  # a kind's fields() returned a key the config does not have
        raise ConfigError(f"experiment kind {kind!r} sets an unknown field ({exc})") from None
    check_fields(cfg)
    return cfg


def _model_fields(raw: Mapping[str, Any], embed_dim: int) -> dict[str, Any]:
    """arch, arch_args (checked against the architecture's own signature) and embed_dim."""
    from mudsc.models import names as arch_names
    from mudsc.models.registry import check_args

    arch = _choice("arch", raw.get("arch", "resnet20"), arch_names())
    arch_args = raw.get("arch_args") or {}
    if not isinstance(arch_args, Mapping):
        raise _fail("arch_args", "a mapping like {width: 4}", arch_args)
    reserved = {"in_channels", "image_size", "embed_dim"} & set(arch_args)
    if reserved:
        raise ConfigError(
            f"config key 'arch_args.{sorted(reserved)[0]}' is set from the dataset / "
            "'embed_dim'; remove it from arch_args"
        )
    try:
        check_args(arch, arch_args)
    except ConfigError as exc:
        raise ConfigError(f"config key 'arch_args': {exc}") from None
    return {
        "arch": arch,
        "arch_args": dict(arch_args),
        "embed_dim": _int("embed_dim", raw.get("embed_dim", embed_dim), 1),
    }


def _run_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Training, merging, calibration and evaluation settings."""
    methods = _methods(raw.get("methods"))
    return {
        "data_dir": _optional(_str)("data_dir", raw.get("data_dir")),
        "train": _train(raw.get("train")),
        "train_images_per_class": _optional(_int)(
            "train_images_per_class", raw.get("train_images_per_class"), 1
        ),
        "test_images_per_class": _optional(_int)(
            "test_images_per_class", raw.get("test_images_per_class"), 1
        ),
        "methods": methods,
        "alpha": _alpha(raw.get("alpha", "auto")),
        "alpha_grid": _grid(raw.get("alpha_grid")),
        "merge": _merge_options(raw.get("merge"), methods),
        "calibration": _calibration(raw.get("calibration")),
        "eval_batch_size": _int("eval_batch_size", raw.get("eval_batch_size", 500), 1),
    }


# --- names and folders -----------------------------------------------------------------


def _name(value: Any) -> str:
    """One plain folder name: the default output folder is ``runs/<name>``, so a name with a
    separator or ``..`` would write outside it."""
    name = _str("name", value)
    if (
        name.strip() in (".", "..")
        or any(sep in name for sep in ("/", "\\"))
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or len(name) > MAX_NAME_CHARS
    ):
        raise _fail(
            "name",
            f"a plain folder name (no '/', '\\', '..' or control characters; at most "
            f"{MAX_NAME_CHARS} characters)",
            name,
        )
    return name


def check_output_dir(value: str, config_dir: Path | None = None) -> str:
    """``value`` if it can be an experiment's own folder, else one ConfigError line.

    Refused: a path starting with ``~`` (mudsc does not expand it), and any folder that is,
    or lies above, the current folder, the home folder or the config file's folder (the
    filesystem root is above all of them): an experiment writes and cleans its folder, so
    it must be one of its own.  The exception is an experiment folder's own config copy,
    which may name that folder (resuming from the copy).
    """
    if value.startswith("~"):
        raise ConfigError(
            f"config key 'output_dir' {shown(value)} starts with '~', which mudsc does not "
            "expand; write the full path"
        )
    target = Path(value).resolve()
    protected = [("the current folder", Path.cwd())]
    try:
        protected.append(("your home folder", Path.home()))
    except RuntimeError:  # no home folder known: nothing to protect there
        pass
    if config_dir is not None and not (Path(config_dir) / EXPERIMENT_MARKER).is_file():
        # an experiment folder's own config copy may name that folder: that is a resume
        protected.append(("the config file's folder", Path(config_dir)))
    elif config_dir is not None:
        protected.append(("a folder above the config file's", Path(config_dir).parent))
    for label, folder in protected:
        folder = folder.resolve()
        if target == folder or target in folder.parents:
            raise ConfigError(
                f"config key 'output_dir' {shown(value)} is {label} or a folder above it "
                f"({target}); name a folder of the experiment's own, like runs/NAME"
            )
    return value


# --- the generic type check ------------------------------------------------------------


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of a config dataclass against its annotation, nested dataclasses
    included: whichever code filled a field in (a section parser, a registered experiment
    kind), a value of the wrong type is one line naming the field, the value and the type."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        key = f"{prefix}{f.name}"
        if not _fits(value, hint):
            raise _fail(key, _expected(hint), value)
        if dataclasses.is_dataclass(value):
            check_fields(value, "" if f.name == "hetero" else f"{key}.")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint`` (tuples may be lists, as YAML gives them)."""
    from mudsc.models.registry import fits

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        pairs = zip(value, args, strict=False)
        return len(value) == len(args) and all(_fits(v, a) for v, a in pairs)
    if origin is dict:
        return isinstance(value, Mapping) and all(_fits(k, args[0]) for k in value)
    return fits(value, hint)


def _expected(hint: Any) -> str:
    """Words for what :func:`_fits` accepts under ``hint``."""
    from mudsc.models.registry import expected

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint) or origin is dict:
        return "a mapping (key: value lines)"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list (each {_expected(args[0])})"
        return f"a list of {len(args)} ({', '.join(_expected(a) for a in args)})"
    return expected(hint)


# --- the file --------------------------------------------------------------------------


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a budget on the document's size after alias expansion."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node | None) -> None:
    """Walk the node graph as the expanded document, stopping at :data:`MAX_YAML_NODES`:
    the work is bounded whatever the aliases say, recursive ones included."""
    stack, count = [root] if root is not None else [], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise ConfigError(
                f"the YAML expands to more than {MAX_YAML_NODES} values through its aliases "
                "(*name); an experiment config needs far fewer, write the values out"
            )
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(part for pair in node.value for part in pair)


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """Parse a small YAML file safely: a regular file of at most :data:`MAX_CONFIG_BYTES`,
    UTF-8, no Python tags, aliases within :data:`MAX_YAML_NODES`; errors are one line."""
    path = regular_file(path, what, ConfigError)
    with path.open("rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{what} {path} is larger than {MAX_CONFIG_BYTES // 1024} KB; a config is a few "
            "KB of text, is this the right file?"
        )
    try:
        return yaml.load(data.decode("utf-8"), Loader=_BoundedLoader)  # noqa: S506
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} nests too deeply to be a config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's complaint and where, on one line, capped (it may quote the file)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = " ".join(str(problem).split())
    return (problem if len(problem) <= 100 else problem[:97] + "...") + where


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML config file; its stem is the default experiment name."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        return parse_config(raw, name=path.stem, config_dir=path.parent)
    except MudscError as exc:
        raise type(exc)(f"{path}: {exc}") from None
