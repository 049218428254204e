"""The paper's protocol end to end (docs/ALGORITHM.md section 8): make sources, merge, report.

One runner for every kind of experiment: it claims and locks the output folder (checked
before anything is written), cleans killed runs' leftovers, copies the config, reuses
or makes each source, merges every group with every method (each merge one resumable
record), and writes results.{json,md,csv,png}.  What differs between kinds lives in a
:class:`~mudsc.experiments.pool.TaskPool`; each kind is one :class:`PoolEntry` in
:data:`POOLS`, which is also where the config's ``kind`` choices come from.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from mudsc.atomic import atomic_write_text, probe_writable, remove_leftovers_below
from mudsc.data import ImageDataset
from mudsc.errors import CorruptCheckpointError, ResourceError
from mudsc.experiments.classification import ClassificationPool
from mudsc.experiments.config import (
    CLASSIFICATION_KEYS,
    HETERO_KEYS,
    ExperimentConfig,
    MergeSettings,
    classification_fields,
    hetero_fields,
)
from mudsc.experiments.hetero import HeteroPool
from mudsc.experiments.pool import MergeGroup, SourceJob, TaskPool
from mudsc.experiments.records import (
    check_key,
    claim_folder,
    jsonable,
    make_key,
    read_record,
    write_marker,
    write_record,
)
from mudsc.experiments.reports import machine_info, write_report
from mudsc.experiments.sources import prepare_dataset
from mudsc.locks import output_lock
from mudsc.merge import MergeConfig, MergeResult, merge_models
from mudsc.methods import METHODS
from mudsc.progress import Progress, quiet
from mudsc.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolEntry:
    """One kind of experiment: its task pool and the config keys only that kind accepts.

    ``fields`` turns those keys of the raw config into :class:`ExperimentConfig` fields;
    ``embed_dim`` is the kind's default embedding width.
    """

    name: str
    factory: Callable[[ExperimentConfig, ImageDataset, Any, Progress], TaskPool]
    keys: tuple[str, ...]
    fields: Callable[[Mapping[str, Any]], dict[str, Any]]
    embed_dim: int


POOLS: Registry[PoolEntry] = Registry(
    "experiment kind",
    "kinds",
    [
        PoolEntry(
            "classification",
            ClassificationPool,
            CLASSIFICATION_KEYS,
            classification_fields,
            embed_dim=512,
        ),
        PoolEntry("hetero", HeteroPool, HETERO_KEYS, hetero_fields, embed_dim=64),
    ],
)


def make_pool(cfg: ExperimentConfig, device: Any, progress: Progress) -> TaskPool:
    """The config's kind of experiment over its (subsampled) data, checked against it."""
    return POOLS[cfg.kind].factory(cfg, prepare_dataset(cfg), device, progress)


def check_experiment(cfg: ExperimentConfig) -> str:
    """Validate ``cfg`` against its data (no training); a one-line summary of the plan."""
    return make_pool(cfg, "cpu", quiet).check()


def ensure_source(job: SourceJob[Any], force: bool, progress: Progress) -> tuple[Any, bool]:
    """Reuse the finished artefact of ``job`` when its key matches, else make it.

    Only a damaged artefact (:class:`CorruptCheckpointError`) is made again; any other load
    error (another architecture, not mudsc's) stops the run instead of training over it.
    """
    if job.path.exists() and not force:
        try:
            found = job.load(job.path)
        except CorruptCheckpointError as exc:
            log.warning("%s is damaged (%s); making it again", job.path, exc)
            found = None
        if found is not None and check_key(job.path, found[0], job.key, force):
            progress(job.label, 1, 1, "reused")
            return found[1], True
    return job.make(), False


def merge_key(settings: MergeSettings, method: str, group: MergeGroup, cfg: ExperimentConfig
              ) -> dict[str, Any]:  # fmt: skip
    """What a merge record depends on: the method's resolved settings (every MergeConfig
    field, defaults included, so a record made under other defaults is made again), the
    group, the source hashes."""
    alpha = METHODS[method].uses_alpha
    auto = alpha and settings.alpha == "auto"
    extra: dict[str, Any] = {}
    if auto and settings.alpha_score != "accuracy":
        extra["alpha_score"] = settings.alpha_score
    if settings.stop_at is not None:
        extra["stop_at"] = settings.stop_at
    return make_key(
        {
            "method": method,
            "alpha": settings.alpha if alpha else None,
            "alpha_grid": settings.alpha_grid if auto else None,
            "merge": {
                k: v
                for k, v in merge_config(settings, method, "cpu").to_dict().items()
                if k != "device"
            },  # fmt: skip
            "calibration": asdict(settings.calibration),
            "test_images_per_class": cfg.test_images_per_class,
            **extra,
            **group.key,
        },
        {"sources": group.hashes},
    )


def merge_config(settings: MergeSettings, method: str, device: Any) -> MergeConfig:
    """The MergeConfig of one row's merges: the preset named under ``merge:`` (if any), the
    row's other merge keys over it, and the experiment's own alpha (0.5 for methods that do
    not use it) and stop point."""
    return MergeConfig.from_preset(
        method=method,
        alpha=settings.alpha if METHODS[method].uses_alpha else 0.5,
        alpha_grid=settings.alpha_grid,
        device=str(device),
        stop_at=settings.stop_at,
        **settings.merge,
    )


def run_merge(
    models: list[nn.Module],
    batches: list[Tensor],
    method: str,
    settings: MergeSettings,
    score: Callable[[MergeResult], float],
    device: Any,
) -> tuple[MergeResult, dict[str, Any]]:
    """One merge with the engine (``alpha: auto`` searched there, one trace and one
    statistics pass for the whole grid); returns the result and a JSON-ready record."""
    uses_alpha = METHODS[method].uses_alpha
    config = merge_config(settings, method, device)
    start = time.perf_counter()
    result = merge_models(models, batches, config, score_fn=score if uses_alpha else None)
    seconds = time.perf_counter() - start
    return result, {
        "method": method,
        "alpha": result.alpha if uses_alpha else None,
        "alpha_scores": result.card()["alpha_scores"],
        "seconds": seconds,
        "timings": result.timings,
        "sweeps": result.sweeps,
    }


def folder_key(cfg: ExperimentConfig) -> dict[str, Any]:
    """What makes an output folder this experiment's own: the resolved config, less where
    things live (output_dir, data_dir) and every merge-level setting (methods, variants,
    alpha, the merge and calibration sections): each merge is its own record keyed by its
    resolved settings, so changing them resumes the folder with the sources reused."""
    config = jsonable(cfg.to_dict())
    merge_level = ("methods", "variants", "alpha", "alpha_grid", "alpha_score", "merge",
                   "calibration")  # fmt: skip
    for where in ("output_dir", "data_dir", *merge_level):
        config.pop(where, None)
    return make_key(config)


def write_config_copy(out: Path, cfg: ExperimentConfig) -> None:
    """config.yaml beside the results: the resolved config, defaults included."""
    text = yaml.safe_dump(jsonable(cfg.to_dict()), sort_keys=False)
    atomic_write_text(out / "config.yaml", text)


class _Run:
    """One invocation: the output folder, what it did, and the merge loop."""

    def __init__(self, cfg: ExperimentConfig, device: Any, force: bool, progress: Progress) -> None:
        self.cfg, self.device, self.force, self.progress = cfg, device, force, progress
        self.work = {"trained": 0, "merged": 0}

    def ensure(self, job: SourceJob[Any]) -> tuple[Any, bool]:
        artefact, reused = ensure_source(job, self.force, self.progress)
        self.work["trained"] += not reused
        return artefact, reused

    def merge_group(self, group: MergeGroup, row_keys: tuple[str, ...]) -> dict[str, Any]:
        """Every method under every settings (the top level's, each variant's) on one group;
        each merge reused from its record or done and saved."""
        label = f"{group.label}: merge"
        rows = dict(group.rows)
        todo = [(s, m) for s in self.cfg.settings() for m in s.methods]
        inputs: dict[str, tuple[list[Tensor], Callable[[MergeResult], float]]] = {}
        for j, (settings, method) in enumerate(todo):
            name = settings.row(method)
            self.progress(label, j, len(todo), name)
            path = group.folder / _record_name(name)
            key = merge_key(settings, method, group, self.cfg)
            record = read_record(path, key, self.force)
            if record is None:
                if settings.label not in inputs:  # drawn once per settings, only if needed
                    inputs[settings.label] = group.inputs(settings)
                batches, score = inputs[settings.label]
                result, info = run_merge(
                    group.models, batches, method, settings, score, self.device
                )
                record = write_record(path, key, {**info, **group.evaluate(result)})
                self.work["merged"] += 1
            rows[name] = {k: record[k] for k in row_keys if k in record}
        self.progress(label, len(todo), len(todo), "done")
        return {**group.entry, "rows": rows}


def _record_name(row: str) -> str:
    """The record file of a row: ``mudsc-zip.json``, or ``mudsc-zip@cal-250.json``."""
    return row.replace(" @ ", "@").replace("/", "_") + ".json"


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResourceError(f"cannot create the output folder {out}: {exc.strerror}") from None


def run_experiment(
    cfg: ExperimentConfig,
    device: torch.device | str = "cpu",
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment ``cfg`` describes; returns what results.json holds.

    Everything is checked (the folder, the config against the data, writability) before
    the first byte is written; the folder stays locked for the whole run.
    """
    step = progress or quiet
    started = time.perf_counter()
    out, key = Path(cfg.output_dir), folder_key(cfg)
    claim_folder(out, key, force)
    pool = make_pool(cfg, device, step)
    pool.check()
    probe_writable(out / "config.yaml")
    _make_folder(out)
    with output_lock(out):
        claim_folder(out, key, force)  # again: another run may have claimed it meanwhile
        for leftover in remove_leftovers_below(out):
            log.info("removed the leftover %s of a killed run", leftover)
        write_marker(out, cfg.name, key)
        write_config_copy(out, cfg)
        run = _Run(cfg, device, force, step)
        groups = [run.merge_group(g, pool.row_keys) for g in pool.groups(out, run.ensure, force)]
        results = {
            "name": cfg.name,
            "kind": cfg.kind,
            "config": jsonable(cfg.to_dict()),
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(device),
            "wall_seconds": time.perf_counter() - started,
            "work": run.work,
            **pool.results(groups),
        }
        write_report(out, json.dumps(results, indent=2), pool.report(results))
    return results
