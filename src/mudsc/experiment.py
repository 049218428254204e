"""The paper's protocol end to end (ALGORITHM.md section 8): train pairs, merge, evaluate, report.

K model pairs, each on its own random class split and each model from its own seed, are
trained (or reused), evaluated alone and as an ensemble, merged with every method and
evaluated on the joint and per-task protocol; results.{md,csv,json,png} give every pair
and the mean and std over pairs.

Resuming: every finished unit of work is one atomically written artefact (a checkpoint
directory or a per-merge JSON) carrying a key.  A unit is reused only when it loads
completely and its key matches; ``.partial`` leftovers of an interrupted write are
deleted, never read.  A key records the configuration (a mismatch means the output
folder belongs to another configuration: refuse without ``force``) and the hashes of the
inputs (a mismatch means a source was re-made: redo silently).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from mudsc.atomic import atomic_write_text
from mudsc.checkpoint import load_checkpoint, save_checkpoint
from mudsc.data import ImageDataset, augment, load_dataset, parse_split, split_classes
from mudsc.errors import MudscError
from mudsc.evaluate import Report, embed, evaluate_embeddings
from mudsc.experiment_config import ExperimentConfig
from mudsc.models import create
from mudsc.models.head import ClassEmbeddingHead
from mudsc.train import train, train_config_dict

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, str], None]
PARTIAL = ".partial"
SUBSAMPLE_SEED = 0


def _quiet(stage: str, done: int, total: int, info: str = "") -> None:
    """Default progress sink: the library never prints."""


# --- resumable records ---------------------------------------------------------------------


def clean_partials(root: Path) -> list[Path]:
    """Delete the ``.*.partial`` leftovers of interrupted atomic writes below ``root``."""
    removed = []
    if not root.is_dir():
        return removed
    for path in sorted(root.rglob(f".*{PARTIAL}"), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        log.info("removed unfinished %s", path)
    return removed


def state_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes): identifies a source."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """Tuples -> lists etc., so a key compares equal after a JSON round trip."""
    return json.loads(json.dumps(value))


def check_key(path: Path, found: Any, expected: dict[str, Any], force: bool) -> bool:
    """True when ``found`` is ``expected``; raise when the configuration part differs."""
    if found == expected:
        return True
    if isinstance(found, dict) and found.get("config") == expected["config"]:
        log.info("%s was made from other inputs; redoing it", path)
        return False
    if force:
        return False
    differing = sorted(
        k
        for k in set(expected["config"]) | set((found or {}).get("config", {}) or {})
        if (found or {}).get("config", {}).get(k) != expected["config"].get(k)
    )
    raise MudscError(
        f"{path} was made by a different configuration (differs in: "
        f"{', '.join(differing) or 'everything'}); use another output folder (-o) or pass "
        "--force to redo it"
    )


def read_record(path: Path, key: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """A finished per-unit JSON record for ``key``, or None when it must be (re)done."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        log.warning("%s is unreadable; redoing it", path)
        return None
    if not isinstance(record, dict) or record.get("complete") is not True:
        log.warning("%s is incomplete; redoing it", path)
        return None
    return record if check_key(path, record.get("key"), key, force) else None


def write_record(path: Path, key: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """Write a finished record atomically; the ``complete`` flag is its last proof of life."""
    record = {"key": key, **_jsonable(payload), "complete": True}
    atomic_write_text(path, json.dumps(record, indent=2))
    return record


# --- data ----------------------------------------------------------------------------------


def _per_class(images: torch.Tensor, labels: torch.Tensor, limit: int | None, seed: int):
    if limit is None:
        return images, labels
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:limit]])
    order = torch.cat(keep).sort().values
    return images[order], labels[order]


def prepare_dataset(cfg: ExperimentConfig) -> ImageDataset:
    """Load the dataset and keep at most the configured images per class (seeded)."""
    data = load_dataset(cfg.dataset, cfg.data_dir)
    if cfg.train_images_per_class is None and cfg.test_images_per_class is None:
        return data
    train_x, train_y = _per_class(
        data.train_images, data.train_labels, cfg.train_images_per_class, SUBSAMPLE_SEED
    )
    test_x, test_y = _per_class(
        data.test_images, data.test_labels, cfg.test_images_per_class, SUBSAMPLE_SEED + 1
    )
    return replace(
        data, train_images=train_x, train_labels=train_y, test_images=test_x, test_labels=test_y
    )


def pair_tasks(cfg: ExperimentConfig, num_classes: int) -> list[list[list[int]]]:
    """The class split of every pair (pair k uses ``split_seeds[k]``)."""
    sizes = parse_split(cfg.split)
    return [split_classes(num_classes, sizes, seed) for seed in cfg.split_seeds]


def check_against_dataset(cfg: ExperimentConfig, data: ImageDataset) -> list[list[list[int]]]:
    """Everything that depends on the data, checked before any training; returns the splits."""
    tasks = pair_tasks(cfg, data.num_classes)
    if cfg.embed_dim < data.num_classes:
        raise MudscError(
            f"config key 'embed_dim' ({cfg.embed_dim}) must be >= the {data.num_classes} "
            f"classes of {cfg.dataset} (one orthonormal embedding per class)"
        )
    build_model(cfg, data)
    for k, split in enumerate(tasks):
        union = [c for t in split for c in t]
        available = int(torch.isin(data.train_labels, torch.tensor(union)).sum())
        if cfg.calibration.size > available:
            raise MudscError(
                f"config key 'calibration.size' ({cfg.calibration.size}) exceeds the "
                f"{available} training images of pair {k}'s classes; lower it"
            )
        if int(cfg.calibration.size * cfg.calibration.holdout) < len(split):
            raise MudscError(
                "config keys 'calibration.size' x 'calibration.holdout' leave fewer held-out "
                f"images than tasks ({len(split)}); raise either"
            )
    return tasks


def build_model(cfg: ExperimentConfig, data: ImageDataset) -> nn.Module:
    """A fresh model of the configured architecture (checks arch_args early)."""
    return create(
        cfg.arch,
        in_channels=data.in_channels,
        image_size=data.image_size,
        embed_dim=cfg.embed_dim,
        **cfg.arch_args,
    )


def draw_calibration(
    data: ImageDataset, classes: Sequence[int], cfg: ExperimentConfig, seed: int, device: Any
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Seeded calibration images of ``classes``: unlabelled fit batches + a labelled holdout.

    Every method gets the same fit batches; the holdout only scores ``alpha: auto``.
    """
    cal = cfg.calibration
    images, labels = data.subset(classes, split="train")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)[: cal.size]
    cut = cal.size - max(1, int(cal.size * cal.holdout))
    fit_x = data.normalize(images[order[:cut]].to(device))
    if cal.augment:
        fit_x = augment(fit_x, data.crop_padding, data.hflip, gen)
    held = (data.normalize(images[order[cut:]]), labels[order[cut:]])
    batches = [fit_x[i : i + cal.batch_size] for i in range(0, len(fit_x), cal.batch_size)]
    return batches, held


# --- source models --------------------------------------------------------------------------


def _train_key(cfg: ExperimentConfig, classes: list[int], seed: int) -> dict[str, Any]:
    return _jsonable({
        "config": {
            "dataset": cfg.dataset,
            "train_images_per_class": cfg.train_images_per_class,
            "arch": cfg.arch,
            "arch_args": cfg.arch_args,
            "embed_dim": cfg.embed_dim,
            "head_seed": cfg.head_seed,
            "classes": classes,
            "train": train_config_dict(replace(cfg.train, seed=seed)),
        },
        "inputs": {},
    })  # fmt: skip


def _train_model(
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
    progress(label, 0, config.epochs, "")
    result = train(
        cfg.arch, data, classes, head, config, {**cfg.arch_args, "embed_dim": cfg.embed_dim},
        device,
        progress=lambda r: progress(
            label, int(r["epoch"]), config.epochs, f"acc {100 * r['accuracy']:.1f}%"
        ),
    )  # fmt: skip
    return result.model, {"history": result.history, "seconds": result.seconds}


def ensure_source(
    path: Path,
    cfg: ExperimentConfig,
    data: ImageDataset,
    classes: list[int],
    head: ClassEmbeddingHead,
    seed: int,
    device: Any,
    force: bool,
    progress: Progress,
    label: str,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load the finished checkpoint for this model, or train and save it atomically."""
    key = _train_key(cfg, classes, seed)
    if path.exists() and not force:
        try:
            ck = load_checkpoint(path, device)
        except MudscError as exc:
            log.warning("%s is not a complete checkpoint (%s); retraining", path, exc)
        else:
            if check_key(path, ck.config.get("experiment_key"), key, force):
                progress(label, 1, 1, "reused")
                return ck.model, {"seconds": ck.config.get("seconds"), "reused": True}
    model, info = _train_model(cfg, data, classes, head, seed, device, progress, label)
    provenance = {
        "kind": "train", "dataset": cfg.dataset, "tasks": [classes],
        "train": key["config"]["train"], "experiment_key": key, **info,
        "torch": torch.__version__, "device": str(device),
    }  # fmt: skip
    save_checkpoint(path, model, provenance, head, force=True)
    return model, {"seconds": info["seconds"], "reused": False}


def _report_dict(report: Report) -> dict[str, Any]:
    return {"joint": report.joint, "per_task": list(report.per_task), "avg": report.avg}


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
        f"model {i}": _report_dict(evaluate_embeddings([e], test[1], tasks, head))
        for i, e in enumerate(embeddings)
    }
    rows["ensemble"] = _report_dict(evaluate_embeddings(embeddings, test[1], tasks, head))
    return rows


# --- merging ---------------------------------------------------------------------------------


def _merge_key(cfg: ExperimentConfig, method: str, tasks: list, hashes: list[str]) -> dict:
    from mudsc.merge import METHODS

    dual = METHODS[method].dual
    return _jsonable({
        "config": {
            "method": method,
            "alpha": cfg.alpha if dual else None,
            "alpha_grid": cfg.alpha_grid if dual and cfg.alpha == "auto" else None,
            "merge": cfg.merge,
            "calibration": asdict(cfg.calibration),
            "tasks": tasks,
            "test_images_per_class": cfg.test_images_per_class,
        },
        "inputs": {"sources": hashes},
    })  # fmt: skip


def _run_merge(
    models: Sequence[nn.Module],
    batches: list[torch.Tensor],
    method: str,
    cfg: ExperimentConfig,
    score_fn: Callable[[Any], float] | None,
    device: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """One merge with the engine; returns the model and a JSON-ready record of it."""
    from mudsc.merge import METHODS, MergeConfig, merge_models

    dual = METHODS[method].dual
    config = MergeConfig(
        method=method,
        alpha=cfg.alpha if dual else 0.5,
        alpha_grid=cfg.alpha_grid,
        device=str(device),
        **cfg.merge,
    )
    start = time.perf_counter()
    result = merge_models(models, batches, config, score_fn=score_fn if dual else None)
    seconds = time.perf_counter() - start
    card = result.card()
    return result.model, {
        "method": method,
        "alpha": result.alpha if dual else None,
        "alpha_scores": card["alpha_scores"],
        "seconds": seconds,
        "timings": result.timings,
        "sweeps": result.sweeps,
    }


def accuracy_score(
    held: tuple[torch.Tensor, torch.Tensor],
    tasks: list[list[int]],
    head: ClassEmbeddingHead,
    batch_size: int,
    device: Any,
) -> Callable[[Any], float]:
    """score_fn for ``alpha: auto``: average per-task accuracy on labelled training images."""

    def score(candidate: Any) -> float:
        emb = embed(candidate.model, held[0], batch_size, device)
        return evaluate_embeddings([emb], held[1], tasks, head).avg

    return score


# --- the run ----------------------------------------------------------------------------------


def machine_info(device: Any) -> dict[str, Any]:
    """Where the numbers came from: CPU model, core count, torch, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "device": str(device),
    }  # fmt: skip
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_config_copy(out: Path, cfg: ExperimentConfig) -> None:
    atomic_write_text(out / "config.yaml", yaml.safe_dump(_jsonable(cfg.to_dict()),
                                                          sort_keys=False))  # fmt: skip


def run_experiment(
    cfg: ExperimentConfig,
    device: torch.device | str = "cpu",
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run (or resume) a classification experiment; returns what results.json holds."""
    from mudsc.merge import METHODS

    step = progress or _quiet
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    data = prepare_dataset(cfg)
    splits = check_against_dataset(cfg, data)
    clean_partials(out)
    out.mkdir(parents=True, exist_ok=True)
    write_config_copy(out, cfg)
    head = ClassEmbeddingHead.orthonormal(data.num_classes, cfg.embed_dim, cfg.head_seed)
    test = (data.normalize(data.test_images), data.test_labels)
    done = {"trained": 0, "merged": 0}

    pairs = []
    for k, tasks in enumerate(splits):
        pair_dir = out / "pairs" / f"pair-{k}"
        models, train_info = [], []
        for i, classes in enumerate(tasks):
            model, info = ensure_source(
                pair_dir / f"model-{i}", cfg, data, classes, head, cfg.model_seeds[k][i],
                device, force, step, f"pair {k}: train model {i}",
            )  # fmt: skip
            done["trained"] += not info["reused"]
            models.append(model)
            train_info.append(info)
        hashes = [state_hash(m) for m in models]

        src_key = _jsonable({
            "config": {"tasks": tasks, "test_images_per_class": cfg.test_images_per_class},
            "inputs": {"sources": hashes},
        })  # fmt: skip
        src_path = pair_dir / "sources.json"
        record = None if force else read_record(src_path, src_key, force)
        if record is None:
            step(f"pair {k}: evaluate sources", 0, 1, "")
            rows = evaluate_sources(models, tasks, head, test, cfg.eval_batch_size, device)
            record = write_record(src_path, src_key, {"rows": rows})
            step(f"pair {k}: evaluate sources", 1, 1, "")
        rows = dict(record["rows"])
        for i, info in enumerate(train_info):
            rows[f"model {i}"]["train_seconds"] = info["seconds"]

        batches, held = draw_calibration(
            data, [c for t in tasks for c in t], cfg, cfg.calibration.seed + k, device
        )
        score = accuracy_score(held, tasks, head, cfg.eval_batch_size, device)
        label = f"pair {k}: merge"
        for j, method in enumerate(cfg.methods):
            step(label, j, len(cfg.methods), method)
            path = pair_dir / "merges" / f"{method}.json"
            key = _merge_key(cfg, method, tasks, hashes)
            record = None if force else read_record(path, key, force)
            if record is None:
                merged, info = _run_merge(models, batches, method, cfg, score, device)
                emb = embed(merged, test[0], cfg.eval_batch_size, device)
                report = evaluate_embeddings([emb], test[1], tasks, head)
                record = write_record(path, key, {**info, **_report_dict(report)})
                done["merged"] += 1
            rows[method] = {
                k2: record[k2]
                for k2 in ("joint", "per_task", "avg", "alpha", "alpha_scores", "seconds")
            }
        step(label, len(cfg.methods), len(cfg.methods), "done")
        pairs.append({"pair": k, "split_seed": cfg.split_seeds[k], "tasks": tasks,
                      "model_seeds": list(cfg.model_seeds[k]), "rows": rows})  # fmt: skip

    order = [f"model {i}" for i in range(len(splits[0]))] + ["ensemble", *cfg.methods]
    results = {
        "name": cfg.name,
        "kind": cfg.kind,
        "config": _jsonable(cfg.to_dict()),
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "wall_seconds": time.perf_counter() - started,
        "work": done,
        "methods": {m: METHODS[m].description for m in cfg.methods},
        "pairs": pairs,
        "summary": summarize(pairs, order),
    }
    write_results(out, results, order)
    return results


# --- summary and reports ---------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std}


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
        if "seconds" in rows[0]:
            entry["seconds"] = mean_std([r["seconds"] for r in rows])
        alphas = [r.get("alpha") for r in rows]
        if all(isinstance(a, int | float) for a in alphas):
            entry["alpha"] = {**mean_std(alphas), "values": alphas}
        summary[name] = entry
    return summary


def _pct(ms: dict[str, float]) -> str:
    return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}"


def _md_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def markdown(results: dict[str, Any], order: list[str]) -> str:
    """results.md: the summary table, then one table per pair."""
    cfg, summary, pairs = results["config"], results["summary"], results["pairs"]
    n_tasks = len(pairs[0]["tasks"])
    task_cols = [f"task {t}" for t in range(n_tasks)]
    header = ["model / method", "joint", *task_cols, "avg", "merge s", "alpha"]
    lines = []
    for name in order:
        s = summary[name]
        alpha = s.get("alpha")
        lines.append([
            name, _pct(s["joint"]), *[_pct(t) for t in s["per_task"]], _pct(s["avg"]),
            f"{s['seconds']['mean']:.1f}" if "seconds" in s else "",
            ", ".join(f"{a:g}" for a in alpha["values"]) if alpha else "",
        ])  # fmt: skip
    m = results["machine"]
    text = [
        f"# {results['name']}",
        "",
        f"{cfg['dataset']} {cfg.get('split', '')}, {cfg['arch']} {cfg['arch_args']}, "
        f"{len(pairs)} pair(s); accuracy in %, mean ± std (sample std) over pairs.",
        "task t = the classes of model t; a source model's avg mixes its own task with one "
        "it never saw. alpha = the chosen balance factor per pair (MuDSC methods; "
        f"'{cfg['alpha']}' in the config), 1 for weight-only matching.",
        "",
        _md_table(header, lines),
        "",
        f"Machine: {m['cpu']}, {m['nproc']} cores, device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f", torch {m['torch']}. Created {results['created']}; this invocation took "
        f"{results['wall_seconds']:.0f} s (trained {results['work']['trained']} models, "
        f"ran {results['work']['merged']} merges; the rest was reused).",
    ]
    for p in pairs:
        rows = []
        for name in order:
            r = p["rows"][name]
            alpha = r.get("alpha")
            rows.append([
                name, f"{100 * r['joint']:.1f}", *[f"{100 * a:.1f}" for a in r["per_task"]],
                f"{100 * r['avg']:.1f}", f"{r['seconds']:.1f}" if "seconds" in r else "",
                f"{alpha:g}" if isinstance(alpha, int | float) else "",
            ])  # fmt: skip
        text += ["", f"## pair {p['pair']}: tasks {p['tasks']} (split seed {p['split_seed']}, "
                 f"model seeds {p['model_seeds']})", "", _md_table(header, rows)]  # fmt: skip
    return "\n".join(text) + "\n"


def csv_text(results: dict[str, Any], order: list[str]) -> str:
    """results.csv: one row per (pair, model/method), then mean and std rows."""
    n_tasks = len(results["pairs"][0]["tasks"])
    header = ["pair", "row", "joint", *[f"task_{t}" for t in range(n_tasks)], "avg",
              "merge_seconds", "alpha"]  # fmt: skip
    lines = [",".join(header)]

    def fmt(v: Any) -> str:
        return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))

    for p in results["pairs"]:
        for name in order:
            r = p["rows"][name]
            lines.append(",".join([str(p["pair"]), name, fmt(r["joint"]),
                                   *[fmt(a) for a in r["per_task"]], fmt(r["avg"]),
                                   fmt(r.get("seconds")), fmt(r.get("alpha"))]))  # fmt: skip
    for stat in ("mean", "std"):
        for name in order:
            s = results["summary"][name]
            lines.append(",".join([
                stat, name, fmt(s["joint"][stat]), *[fmt(t[stat]) for t in s["per_task"]],
                fmt(s["avg"][stat]), fmt(s.get("seconds", {}).get(stat)),
                fmt(s.get("alpha", {}).get(stat)),
            ]))  # fmt: skip
    return "\n".join(lines) + "\n"


def bar_chart(path: Path, title: str, names: list[str], series: dict[str, tuple[list, list]],
              ylabel: str, ylim: tuple[float, float] | None = (0, 100)) -> None:  # fmt: skip
    """Grouped bars with std error bars, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.5))
    width = 0.8 / len(series)
    for s, (label, (means, stds)) in enumerate(series.items()):
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}{PARTIAL}")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def write_results(out: Path, results: dict[str, Any], order: list[str]) -> None:
    """results.json, results.csv, results.md and results.png, each written atomically."""
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.csv", csv_text(results, order))
    atomic_write_text(out / "results.md", markdown(results, order))
    names = [n for n in order if not n.startswith("model ")]
    summary = results["summary"]
    series = {
        metric: ([100 * summary[n][metric]["mean"] for n in names],
                 [100 * summary[n][metric]["std"] for n in names])
        for metric in ("joint", "avg")
    }  # fmt: skip
    cfg = results["config"]
    title = (f"{results['name']}: {cfg['dataset']} {cfg['split']}, {cfg['arch']}, "
             f"{len(results['pairs'])} pair(s), mean ± std")  # fmt: skip
    bar_chart(out / "results.png", title, names, series, "test accuracy (%)")
