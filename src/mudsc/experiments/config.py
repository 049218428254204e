"""The YAML schema of ``mudsc experiment``: one validated, frozen value per run.

Every key is checked here, before any work starts, so a typo costs seconds rather than a
half-finished run: unknown keys are rejected and each message names the key, what it
must be and, for choices, the valid values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mudsc.errors import MudscError
from mudsc.merge import ALPHA_GRID, MergeConfig
from mudsc.methods import method_names
from mudsc.train import TrainConfig

HETERO_TASKS = ("classification", "autoencode", "denoise", "rotation")
# MergeConfig fields the experiment sets itself (top-level keys, the device, the
# calibration split); every other field may be set under ``merge:``.
RUNNER_MERGE_FIELDS = ("method", "alpha", "alpha_grid", "holdout", "device", "seed", "stop_at")
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
    merge: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration = field(default_factory=Calibration)
    eval_batch_size: int = 500
    output_dir: str = ""
    hetero: HeteroSettings | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"].pop("seed", None)
        if self.hetero is None:
            d.pop("hetero")
        return d


# --- field checks ----------------------------------------------------------------------


def _fail(key: str, must: str, value: Any) -> MudscError:
    return MudscError(f"config key {key!r} must be {must}, got {value!r}")


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
        raise MudscError(
            f"unknown config key {f'{key}.{unknown[0]}'!r}; valid keys under {key!r}: "
            f"{', '.join(allowed)}"
        )
    return dict(value)


def _choice(key: str, value: Any, choices: list[str] | tuple[str, ...]) -> str:
    if value not in choices:
        raise MudscError(
            f"config key {key!r}: {value!r} is not valid; choose one of {', '.join(choices)}"
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


def _calibration(raw: Any) -> Calibration:
    keys = tuple(f.name for f in fields(Calibration))
    values = _mapping("calibration", raw, keys)
    checks: dict[str, Callable[[str, Any], Any]] = {
        "size": lambda k, v: _int(k, v, 2),
        "batch_size": lambda k, v: _int(k, v, 1),
        "holdout": lambda k, v: _number(k, v, 0.0, 0.9, open_low=True),
        "augment": _bool,
        "seed": _int,
    }
    return Calibration(**{k: checks[k](f"calibration.{k}", v) for k, v in values.items()})


def _merge_options(raw: Any, methods: tuple[str, ...]) -> dict[str, Any]:
    values = _mapping("merge", raw, MERGE_KEYS)
    for method in methods:
        try:
            MergeConfig(method=method, **values)
        except MudscError as exc:
            raise MudscError(f"config section 'merge': {exc}") from None
        except TypeError as exc:  # a value of the wrong type inside MergeConfig's checks
            raise MudscError(f"config section 'merge': a value has a wrong type ({exc})") from None
    return values


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
        raise MudscError(f"config key 'methods' lists a method twice: {list(methods)}")
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
        raise MudscError(f"config key 'tasks' lists a task twice: {list(tasks)}")
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
        raise MudscError(f"config key 'seeds' must give every task its own seed, got {list(seeds)}")
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
CLASSIFICATION_KEYS = ("head_seed", "split", "pairs", "split_seeds", "model_seeds")
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
            raise MudscError(
                f"config key 'model_seeds[{k}]' must give each model its own seed, got {list(s)}"
            )
    return pairs, split_seeds, model_seeds


def classification_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The ``classification`` kind's keys (:data:`CLASSIFICATION_KEYS`) as config fields."""
    pairs, split_seeds, model_seeds = _pairs_and_seeds(raw)
    return {
        "head_seed": _int("head_seed", raw.get("head_seed", 0)),
        "split": raw.get("split", "5+5"),
        "pairs": pairs,
        "split_seeds": split_seeds,
        "model_seeds": model_seeds,
    }


def parse_config(raw: Any, name: str = "experiment") -> ExperimentConfig:
    """Validate a parsed YAML mapping into an :class:`ExperimentConfig`."""
    if not isinstance(raw, Mapping):
        raise MudscError("an experiment config must be a YAML mapping of keys to values")
    from mudsc.experiments.runner import POOLS  # the runner imports this module

    kind = _choice("kind", raw.get("kind", "classification"), POOLS.names())
    pool = POOLS[kind]
    allowed = _COMMON + pool.keys
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise MudscError(
            f"unknown config key {unknown[0]!r} (kind {kind!r}); valid keys: {', '.join(allowed)}"
        )
    if raw.get("dataset") is None:
        from mudsc.data import dataset_names

        raise MudscError(
            f"config key 'dataset' is missing; set it to one of {', '.join(dataset_names())}"
        )
    from mudsc.data import dataset_names
    from mudsc.models import names as arch_names

    dataset = _choice("dataset", str(raw["dataset"]).strip().lower(), dataset_names())
    arch = _choice("arch", raw.get("arch", "resnet20"), arch_names())
    arch_args = raw.get("arch_args") or {}
    if not isinstance(arch_args, Mapping):
        raise _fail("arch_args", "a mapping like {width: 4}", arch_args)
    reserved = {"in_channels", "image_size", "embed_dim"} & set(arch_args)
    if reserved:
        raise MudscError(
            f"config key 'arch_args.{sorted(reserved)[0]}' is set from the dataset / "
            "'embed_dim'; remove it from arch_args"
        )
    methods = _methods(raw.get("methods"))
    values: dict[str, Any] = {
        "name": _str("name", raw.get("name", name)),
        "kind": kind,
        "dataset": dataset,
        "data_dir": _optional(_str)("data_dir", raw.get("data_dir")),
        "arch": arch,
        "arch_args": dict(arch_args),
        "embed_dim": _int("embed_dim", raw.get("embed_dim", pool.embed_dim), 1),
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
    values["output_dir"] = _str("output_dir", raw.get("output_dir", f"runs/{values['name']}"))
    values.update(pool.fields(raw))
    return ExperimentConfig(**values)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML config file; its stem is the default experiment name."""
    path = Path(path)
    if not path.is_file():
        raise MudscError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MudscError(f"{path} is not valid YAML: {exc}") from None
    try:
        return parse_config(raw, name=path.stem)
    except MudscError as exc:
        raise MudscError(f"{path}: {exc}") from None
