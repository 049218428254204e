"""Classification pairs (the paper's main protocol): K pairs of models on disjoint classes.

Each pair has its own random class split and each model its own seed; the models are
trained (or reused), evaluated alone and as an ensemble, and every merge is scored on
the joint and per-task protocol through the shared frozen class embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mudsc.checkpoint import load_checkpoint, save_checkpoint
from mudsc.data import ImageDataset, draw_calibration, parse_split, split_classes
from mudsc.errors import ConfigError, MudscError
from mudsc.evaluate import HeadView, Report, embed, evaluate_embeddings
from mudsc.experiments.classification_report import classification_report
from mudsc.experiments.config import ExperimentConfig, MergeSettings
from mudsc.experiments.pool import Ensure, Inputs, MergeGroup, SourceJob
from mudsc.experiments.records import make_key, read_record, state_hash, write_record
from mudsc.experiments.reports import ReportFiles, mean_std
from mudsc.experiments.sources import build_model
from mudsc.merge import MergeResult
from mudsc.methods import METHODS
from mudsc.models.head import ClassEmbeddingHead
from mudsc.modes import eval_mode
from mudsc.partial import PartialMerge, resolve_stop
from mudsc.progress import Progress
from mudsc.spaces.trace import trace_model
from mudsc.stages import agreement
from mudsc.train import train, train_config_dict

MERGE_ROW_KEYS = ("joint", "per_task", "avg", "alpha", "alpha_scores", "seconds", "params", "flops")


def pair_tasks(cfg: ExperimentConfig, num_classes: int) -> list[list[list[int]]]:
    """The class split of every pair (pair k uses ``split_seeds[k]``)."""
    sizes = parse_split(cfg.split)
    return [split_classes(num_classes, sizes, seed) for seed in cfg.split_seeds]


def report_dict(report: Report) -> dict[str, Any]:
    return {"joint": report.joint, "per_task": list(report.per_task), "avg": report.avg}


def train_source(
    cfg: ExperimentConfig,
    data: ImageDataset,
    classes: list[int],
    head: ClassEmbeddingHead,
    seed: int,
    device: Any,
    progress: Progress,
    label: str,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one source model (its own seed, its own task's images only)."""
    config = replace(cfg.train, seed=seed)
    result = train(
        cfg.arch, data, classes, head, config, {**cfg.arch_args, "embed_dim": cfg.embed_dim},
        device, progress=progress, stage=label,
    )  # fmt: skip
    return result.model, {"history": result.history, "seconds": result.seconds}


def evaluate_sources(
    models: Sequence[nn.Module],
    tasks: list[list[int]],
    head: ClassEmbeddingHead,
    test: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    device: Any,
) -> dict[str, dict[str, Any]]:
    """Each source alone (own task = its per_task entry; joint over all classes) + ensemble."""
    embeddings = [embed(m, test[0], batch_size, device) for m in models]
    rows = {
        f"model {i}": report_dict(evaluate_embeddings([e], test[1], tasks, head))
        for i, e in enumerate(embeddings)
    }
    rows["ensemble"] = report_dict(evaluate_embeddings(embeddings, test[1], tasks, head))
    return rows


def merged_embeddings(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: Any
) -> list[torch.Tensor]:
    """Embeddings of a merged model: one tensor, or one per head of a partial merge (scored
    like an ensemble: head i is the expert of task i)."""
    if isinstance(model, PartialMerge):
        heads = [HeadView(model, i) for i in range(model.n_models)]
        return [embed(h, images, batch_size, device) for h in heads]
    return [embed(model, images, batch_size, device)]


def held_out_score(
    kind: str,
    held: tuple[torch.Tensor, torch.Tensor],
    tasks: list[list[int]],
    head: ClassEmbeddingHead,
    sources: Sequence[nn.Module],
    batch_size: int,
    device: Any,
) -> Callable[[MergeResult], float]:
    """score_fn for ``alpha: auto`` on labelled held-out training images: average per-task
    accuracy, mean output agreement with the sources (labels unused), or minus the mean
    per-task cross-entropy."""
    images, labels = held

    def accuracy(candidate: MergeResult) -> float:
        embeddings = merged_embeddings(candidate.model, images, batch_size, device)
        return evaluate_embeddings(embeddings, labels, tasks, head).avg

    def agreeing(candidate: MergeResult) -> float:
        batches = [images[i : i + batch_size].to(device) for i in range(0, len(images), batch_size)]
        return agreement(candidate.model, sources, batches)

    def loss(candidate: MergeResult) -> float:
        embeddings = merged_embeddings(candidate.model, images, batch_size, device)
        total = 0.0
        for t, task in enumerate(tasks):
            mask = torch.isin(labels, torch.tensor(task))
            emb = embeddings[min(t, len(embeddings) - 1)][mask]
            target = torch.searchsorted(torch.tensor(task), labels[mask])
            total += nn.functional.cross_entropy(head(emb, task), target).item()
        return -total / len(tasks)

    return {"accuracy": accuracy, "agreement": agreeing, "loss": loss}[kind]


def cost_ratios(merged: nn.Module, source: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """Parameters and forward FLOPs of a merged model relative to one source (1 for a full
    merge, up to N for a partial merge that keeps N heads)."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(model: nn.Module) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), eval_mode(model):
            model(example)
        return counter.get_total_flops()

    def params(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    return {
        "params": params(merged) / params(source),
        "flops": flops(merged) / max(flops(source), 1),
    }


def summarize(pairs: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
    """Mean +- std over pairs of every row's joint, per-task, avg, merge time and alpha."""
    summary = {}
    for name in order:
        rows = [p["rows"][name] for p in pairs]
        entry: dict[str, Any] = {
            "joint": mean_std([r["joint"] for r in rows]),
            "per_task": [
                mean_std([r["per_task"][t] for r in rows]) for t in range(len(rows[0]["per_task"]))
            ],  # fmt: skip
            "avg": mean_std([r["avg"] for r in rows]),
        }
        for extra in ("seconds", "params", "flops"):
            if all(extra in r for r in rows):
                entry[extra] = mean_std([r[extra] for r in rows])
        alphas = [r.get("alpha") for r in rows]
        if all(isinstance(a, int | float) for a in alphas):
            entry["alpha"] = {**mean_std(alphas), "values": alphas}
        summary[name] = entry
    return summary


class ClassificationPool:
    """Pairs of classifiers, each model trained on its own task's classes."""

    row_keys = MERGE_ROW_KEYS

    def __init__(
        self, cfg: ExperimentConfig, data: ImageDataset, device: Any, progress: Progress
    ) -> None:
        self.cfg, self.data, self.device, self.progress = cfg, data, device, progress
        self.splits = pair_tasks(cfg, data.num_classes)

    def check(self) -> str:
        """Everything that depends on the data, checked before any training."""
        cfg, data = self.cfg, self.data
        if cfg.embed_dim < data.num_classes:
            raise ConfigError(
                f"config key 'embed_dim' ({cfg.embed_dim}) must be >= the {data.num_classes} "
                f"classes of {cfg.dataset} (one orthonormal embedding per class)"
            )
        model = build_model(cfg, data)
        for settings in cfg.settings():
            self._check_calibration(settings)
        self._check_stops(model)
        return f"{cfg.pairs} pair(s), class splits {self.splits}"

    def _check_stops(self, model: nn.Module) -> None:
        """Every variant's partial-merge stop point resolves on the model, before training."""
        settings = [s for s in self.cfg.settings() if s.stop_at is not None]
        if not settings:
            return
        traced = trace_model(model.eval(), self.data.normalize(self.data.train_images[:2]),
                             verify=False)  # fmt: skip
        for s in settings:
            try:
                resolve_stop(traced, s.stop_at)
            except MudscError as exc:
                raise ConfigError(f"config key 'variants' ({s.label!r}): {exc}") from None

    def _check_calibration(self, settings: MergeSettings) -> None:
        cal, data = settings.calibration, self.data
        where = f" (variant {settings.label!r})" if settings.label else ""
        for k, split in enumerate(self.splits):
            union = [c for t in split for c in t]
            available = int(torch.isin(data.train_labels, torch.tensor(union)).sum())
            if cal.size > available:
                raise ConfigError(
                    f"config key 'calibration.size' ({cal.size}){where} exceeds the "
                    f"{available} training images of pair {k}'s classes; lower it"
                )
            if int(cal.size * cal.holdout) < len(split):
                raise ConfigError(
                    f"config keys 'calibration.size' x 'calibration.holdout'{where} leave "
                    f"fewer held-out images than tasks ({len(split)}); raise either"
                )

    def _train_key(self, classes: list[int], seed: int) -> dict[str, Any]:
        cfg = self.cfg
        return make_key({
            "dataset": cfg.dataset,
            "train_images_per_class": cfg.train_images_per_class,
            "arch": cfg.arch,
            "arch_args": cfg.arch_args,
            "embed_dim": cfg.embed_dim,
            "head_seed": cfg.head_seed,
            "classes": classes,
            "train": train_config_dict(replace(cfg.train, seed=seed)),
        })  # fmt: skip

    def _source_job(
        self, path: Path, classes: list[int], head: ClassEmbeddingHead, seed: int, label: str
    ) -> SourceJob[tuple[nn.Module, Any]]:
        """A checkpoint whose provenance carries its key; the artefact: (model, seconds)."""
        cfg, device = self.cfg, self.device
        key = self._train_key(classes, seed)

        def load(where: Path) -> tuple[Any, tuple[nn.Module, Any]]:
            ck = load_checkpoint(where, device)  # damaged: the runner retrains; else it stops
            return ck.config.get("experiment_key"), (ck.model, ck.config.get("seconds"))

        def make() -> tuple[nn.Module, Any]:
            model, info = train_source(
                cfg, self.data, classes, head, seed, device, self.progress, label
            )
            provenance = {
                "kind": "train", "dataset": cfg.dataset, "tasks": [classes],
                "train": key["config"]["train"], "experiment_key": key, **info,
                "torch": torch.__version__, "device": str(device),
            }  # fmt: skip
            save_checkpoint(path, model, provenance, head, force=True)
            return model, info["seconds"]

        return SourceJob(path, key, label, load, make)

    def groups(self, out: Path, ensure: Ensure, force: bool) -> Iterator[MergeGroup]:
        cfg, data, device = self.cfg, self.data, self.device
        head = ClassEmbeddingHead.orthonormal(data.num_classes, cfg.embed_dim, cfg.head_seed)
        test = (data.normalize(data.test_images), data.test_labels)
        for k, tasks in enumerate(self.splits):
            pair_dir = out / "pairs" / f"pair-{k}"
            models, seconds = [], []
            for i, classes in enumerate(tasks):
                label = f"pair {k}: train model {i}"
                seed = cfg.model_seeds[k][i]
                job = self._source_job(pair_dir / f"model-{i}", classes, head, seed, label)
                (model, train_seconds), _ = ensure(job)
                models.append(model)
                seconds.append(train_seconds)
            hashes = [state_hash(m) for m in models]
            rows = self._source_rows(pair_dir, k, models, tasks, hashes, head, test, force)
            for i, s in enumerate(seconds):
                rows[f"model {i}"]["train_seconds"] = s

            def evaluate(result: MergeResult, tasks: list[list[int]] = tasks,
                         source: nn.Module = models[0]) -> dict[str, Any]:  # fmt: skip
                emb = merged_embeddings(result.model, test[0], cfg.eval_batch_size, device)
                report = report_dict(evaluate_embeddings(emb, test[1], tasks, head))
                return {**report, **cost_ratios(result.model, source, test[0][:1].to(device))}

            yield MergeGroup(
                label=f"pair {k}",
                folder=pair_dir / "merges",
                models=models,
                hashes=hashes,
                key={"tasks": tasks},
                inputs=self._inputs(k, tasks, models, head),
                evaluate=evaluate,
                entry={
                    "pair": k,
                    "split_seed": cfg.split_seeds[k],
                    "tasks": tasks,
                    "model_seeds": list(cfg.model_seeds[k]),
                },  # fmt: skip
                rows=rows,
            )

    def _inputs(
        self, k: int, tasks: list[list[int]], models: list[nn.Module], head: ClassEmbeddingHead
    ) -> Inputs:
        """Pair k's calibration draw and alpha score under one row's settings (pair k draws
        with ``seed + k``, so pairs see different images and variants of one pair the same
        ones wherever their calibration keys agree)."""
        cfg, data, device = self.cfg, self.data, self.device

        def prepare(settings: MergeSettings) -> tuple[list[torch.Tensor], Any]:
            cal = settings.calibration
            calibration = draw_calibration(
                data, [c for t in tasks for c in t], cal.size, cal.batch_size, cal.seed + k,
                device, augment=cal.augment, holdout=cal.holdout,
            )  # fmt: skip
            assert calibration.held is not None
            score = held_out_score(settings.alpha_score, calibration.held, tasks, head, models,
                                   cfg.eval_batch_size, device)  # fmt: skip
            return calibration.batches, score

        return prepare

    def _source_rows(
        self, pair_dir: Path, k: int, models: list[nn.Module], tasks: list[list[int]],
        hashes: list[str], head: ClassEmbeddingHead, test: tuple[torch.Tensor, torch.Tensor],
        force: bool,
    ) -> dict[str, dict[str, Any]]:  # fmt: skip
        """The sources' own test rows, from their record or evaluated and recorded."""
        cfg = self.cfg
        key = make_key(
            {"tasks": tasks, "test_images_per_class": cfg.test_images_per_class},
            {"sources": hashes},
        )
        path = pair_dir / "sources.json"
        record = read_record(path, key, force)
        if record is None:
            label = f"pair {k}: evaluate sources"
            self.progress(label, 0, 1, "")
            rows = evaluate_sources(models, tasks, head, test, cfg.eval_batch_size, self.device)
            record = write_record(path, key, {"rows": rows})
            self.progress(label, 1, 1, "")
        return dict(record["rows"])

    def order(self) -> list[str]:
        """Row order of every table: the sources, the ensemble, the methods."""
        n_models = len(self.splits[0])
        return [f"model {i}" for i in range(n_models)] + ["ensemble", *self.cfg.rows()]

    def results(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "methods": {m: METHODS[m].description for s in self.cfg.settings() for m in s.methods},
            "pairs": groups,
            "summary": summarize(groups, self.order()),
        }

    def report(self, results: dict[str, Any]) -> ReportFiles:
        return classification_report(results, self.order())
