"""The ``mudsc`` command line: thin wrappers that parse, call the library and print.

Every user mistake surfaces as a :class:`MudscError`, printed as one line on stderr with
exit code 2; the library itself never prints.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mudsc import __version__
from mudsc.errors import MudscError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Merge separately trained networks without training (MuDSC and its baselines).",
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def friendly(fn: F) -> F:
    """Turn MudscError (and Ctrl-C) into one clear line and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MudscError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; finished outputs are kept, partial ones removed")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def resolve_device(name: str) -> torch.device:
    """Check that the asked-for device exists before any work starts."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MudscError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MudscError(
            "--device cuda was asked for but no CUDA GPU is available; use --device cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MudscError("--device mps was asked for but MPS is not available; use --device cpu")
    return device


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


def report_table(title: str, rows: list[dict[str, Any]]) -> Table:
    """Rows of {"method", "joint", "per_task", "avg", ...} as a percentage table."""
    n_tasks = max((len(r["per_task"]) for r in rows), default=0)
    table = Table(title=title)
    table.add_column("model / method")
    table.add_column("joint", justify="right")
    for t in range(n_tasks):
        table.add_column(f"task {t}", justify="right")
    table.add_column("avg", justify="right")
    extra = [k for k in ("alpha", "seconds") if any(k in r for r in rows)]
    for k in extra:
        table.add_column(k, justify="right")
    for r in rows:
        cells = [r["method"], f"{100 * r['joint']:.1f}"]
        cells += [f"{100 * a:.1f}" for a in r["per_task"]] + [""] * (n_tasks - len(r["per_task"]))
        cells.append(f"{100 * r['avg']:.1f}")
        for k in extra:
            v = r.get(k)
            cells.append("" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)))
        table.add_row(*cells)
    return table


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log library progress."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        console.print(f"mudsc {__version__}")
        raise typer.Exit()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _arch_args(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MudscError(
            f"--arch-args must be a JSON object, e.g. '{{\"width\": 4}}': {exc}"
        ) from exc
    if not isinstance(value, dict):
        raise MudscError("--arch-args must be a JSON object, e.g. '{\"width\": 4}'")
    return value


@app.command()
@friendly
def train(
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
    arch: str = typer.Option("resnet20", help="Architecture name (see `mudsc spec --list`)."),
    width: float = typer.Option(None, help="Width multiplier (architectures that have one)."),
    arch_args: str = typer.Option(None, help="Extra architecture arguments as JSON."),
    dataset: str = typer.Option("fashion-mnist", help="Dataset name."),
    data_dir: Path = typer.Option(None, help="Where the dataset files are."),
    task: str = typer.Option(None, help="Class ids, e.g. 0,2,4,6,8 (default: all classes)."),
    split: str = typer.Option(None, help="Random split like 5+5; use with --task-index."),
    split_seed: int = typer.Option(0, help="Seed of the random class split."),
    task_index: int = typer.Option(0, help="Which part of --split to train on."),
    seed: int = typer.Option(0, help="Seed for initialisation, order and augmentation."),
    epochs: int = typer.Option(200, help="Training epochs (the paper uses 200)."),
    batch_size: int = typer.Option(500),
    lr: float = typer.Option(0.4, help="Peak learning rate."),
    momentum: float = typer.Option(0.9),
    weight_decay: float = typer.Option(5e-4),
    warmup_epochs: float = typer.Option(5.0),
    no_augment: bool = typer.Option(False, help="Disable random crop / flip."),
    embed_dim: int = typer.Option(512, help="Dimension of the shared class embeddings."),
    head_seed: int = typer.Option(0, help="Seed of the orthonormal class embeddings."),
    class_embeddings: Path = typer.Option(None, help="File of class embeddings (C x D)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N."),
    force: bool = typer.Option(False, help="Replace an existing output directory."),
) -> None:
    """Train a source model on one task's classes and save it as a checkpoint."""
    from mudsc.atomic import refuse_existing
    from mudsc.checkpoint import save_checkpoint
    from mudsc.data import (
        load_dataset,
        parse_classes,
        parse_split,
        split_classes,
        validate_classes,
    )
    from mudsc.models import names
    from mudsc.models.head import ClassEmbeddingHead
    from mudsc.train import TrainConfig, train_config_dict
    from mudsc.train import train as run_train

    refuse_existing(output, force)
    dev = resolve_device(device)
    if arch not in names():  # before the (slow) dataset load
        raise MudscError(f"unknown architecture {arch!r}; valid names: {', '.join(names())}")
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, augment=not no_augment, seed=seed,
    )  # fmt: skip
    data = load_dataset(dataset, data_dir)
    if task and split:
        raise MudscError("give either --task or --split, not both")
    if split:
        parts = split_classes(data.num_classes, parse_split(split), split_seed)
        if not 0 <= task_index < len(parts):
            raise MudscError(f"--task-index must be in 0..{len(parts) - 1} for split {split}")
        classes = parts[task_index]
    else:
        classes = parse_classes(task) if task else list(range(data.num_classes))
    classes = validate_classes(classes, data.num_classes)
    head = (
        ClassEmbeddingHead.from_file(class_embeddings)
        if class_embeddings
        else ClassEmbeddingHead.orthonormal(data.num_classes, embed_dim, head_seed)
    )
    extra = _arch_args(arch_args)
    if width is not None:
        extra["width"] = width
    with progress_bar() as bar:
        job = bar.add_task(f"train {arch}", total=epochs, info="")
        result = run_train(
            arch, data, classes, head, config, extra, dev,
            progress=lambda r: bar.update(
                job, advance=1, info=f"loss {r['loss']:.3f} acc {100 * r['accuracy']:.1f}%"
            ),
        )  # fmt: skip
    provenance = {
        "kind": "train",
        "dataset": dataset,
        "tasks": [classes],
        "train": train_config_dict(config),
        "history": result.history,
        "seconds": result.seconds,
        "torch": torch.__version__,
        "device": str(dev),
    }
    save_checkpoint(output, result.model, provenance, head, force=force)
    console.print(
        f"saved {output} ({arch}, classes {classes}, {result.seconds:.1f} s, "
        f"final train accuracy {100 * result.history[-1]['accuracy']:.1f}%)"
    )


def _tasks_option(text: str | None) -> list[list[int]] | None:
    if not text:
        return None
    from mudsc.data import parse_classes

    return [parse_classes(part) for part in text.split(";") if part.strip()]


@app.command("eval")
@friendly
def eval_command(
    checkpoints: list[Path] = typer.Argument(
        ..., help="One checkpoint, or several for an ensemble."
    ),
    dataset: str = typer.Option(
        None, help="Dataset (default: the one recorded in the checkpoint)."
    ),
    data_dir: Path = typer.Option(None),
    tasks: str = typer.Option(None, help="Tasks as class lists, e.g. '0,1,2;3,4,5'."),
    batch_size: int = typer.Option(500),
    device: str = typer.Option("cpu"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Joint, per-task and average accuracy of one model or an ensemble."""
    from mudsc.checkpoint import load_checkpoint
    from mudsc.data import load_dataset
    from mudsc.evaluate import evaluate

    dev = resolve_device(device)
    loaded = [load_checkpoint(p, dev) for p in checkpoints]
    name = dataset or loaded[0].dataset
    if name is None:
        raise MudscError("the checkpoint records no dataset; pass --dataset")
    task_lists = _tasks_option(tasks)
    if task_lists is None:
        task_lists = [t for ck in loaded for t in ck.tasks]
    if not task_lists:
        raise MudscError("the checkpoints record no tasks; pass --tasks '0,1,2;3,4,5'")
    head = loaded[0].head
    if head is None:
        raise MudscError(f"{checkpoints[0]} has no class-embedding head (head.safetensors)")
    data = load_dataset(name, data_dir)
    images = data.normalize(data.test_images)
    models = [ck.model for ck in loaded]
    report = evaluate(models if len(models) > 1 else models[0], images, data.test_labels,
                      task_lists, head, dev, batch_size)  # fmt: skip
    label = "ensemble" if len(models) > 1 else str(checkpoints[0])
    row = {"method": label, **report.to_dict()}
    if as_json:
        console.print_json(json.dumps(row))
    else:
        console.print(report_table(f"{name} test set ({report.n_images} images)", [row]))


@app.command()
@friendly
def spec(
    checkpoint: Path = typer.Argument(None, help="A checkpoint directory."),
    arch: str = typer.Option(None, help="Trace a zoo architecture instead of a checkpoint."),
    arch_args: str = typer.Option(None, help="Architecture arguments as JSON."),
    in_channels: int = typer.Option(3),
    image_size: int = typer.Option(32),
    list_archs: bool = typer.Option(False, "--list", help="List the zoo's architectures."),
    as_json: bool = typer.Option(False, "--json", help="Print the spec itself as JSON."),
    full: bool = typer.Option(False, "--full", help="List every member module."),
) -> None:
    """Print the merge spaces that tracing finds in a model."""
    from mudsc.models import create, names
    from mudsc.spaces import trace

    if list_archs:
        console.print("\n".join(names()))
        return
    if (checkpoint is None) == (arch is None):
        raise MudscError("give a checkpoint or --arch NAME (one of them)")
    if checkpoint is not None:
        from mudsc.checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint).model
        in_channels = model.config.get("in_channels", in_channels)
        image_size = model.config.get("image_size", image_size)
    else:
        model = create(
            arch, in_channels=in_channels, image_size=image_size, **_arch_args(arch_args)
        )
    merge_spec = trace(model.eval(), torch.zeros(2, in_channels, image_size, image_size))
    if as_json:
        sys.stdout.write(merge_spec.to_json() + "\n")
    else:
        console.print(merge_spec.describe(full), highlight=False, soft_wrap=True)


@app.command()
@friendly
def demo(
    device: str = typer.Option("cpu"),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """Train two small models on disjoint halves of the embedded MNIST subset, then merge them."""
    from mudsc.demo import run_demo

    dev = resolve_device(device)
    start = time.perf_counter()
    with progress_bar() as bar:
        jobs: dict[str, Any] = {}

        def step(stage: str, done: int, total: int, info: str = "") -> None:
            if stage not in jobs:
                jobs[stage] = bar.add_task(stage, total=total, info="")
            bar.update(jobs[stage], completed=done, info=info)

        result = run_demo(dev, progress=step)
    if as_json:
        sys.stdout.write(json.dumps({"rows": result["rows"], "tasks": result["tasks"]}) + "\n")
        return
    console.print(report_table(result["title"], result["rows"]))
    console.print(f"total {time.perf_counter() - start:.1f} s")


def _calibration(
    data: Any, classes: list[int], size: int, batch_size: int, seed: int, holdout: float | None
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """Seeded calibration images from the tasks' training split, plus an optional
    labelled held-out slice for scoring alpha."""
    images, labels = data.subset(classes, split="train")
    if not 0 < size <= len(images):
        raise MudscError(
            f"--calibration-size must be in 1..{len(images)} (training images of classes {classes})"
        )
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:size]
    x, y = data.normalize(images[order]), labels[order]
    held = None
    if holdout is not None:
        cut = max(1, int(size * (1 - holdout)))
        if cut >= size:
            raise MudscError("--alpha auto needs a calibration set of at least 2 images")
        x, y, held = x[:cut], y[:cut], (x[cut:], y[cut:])
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)], held


@app.command()
@friendly
def merge(
    checkpoints: list[Path] = typer.Argument(..., help="Two or more source checkpoints."),
    output: Path = typer.Option(..., "--output", "-o", help="Merged checkpoint directory."),
    method: str = typer.Option(
        "mudsc-zip", help="avg, rebasin, act-align, zipit, wzip, mudsc-align, mudsc-zip."
    ),
    alpha: str = typer.Option("0.5", help="Weight-space share in [0, 1], or 'auto' (grid search)."),
    data: str = typer.Option(
        None, "--data", help="Calibration dataset (default: the checkpoints')."
    ),
    data_dir: Path = typer.Option(None),
    calibration_size: int = typer.Option(1000, help="Calibration images (labels unused)."),
    batch_size: int = typer.Option(250),
    seed: int = typer.Option(0),
    repair_mode: str = typer.Option("auto", "--repair", help="auto, bn, repair or none."),
    zip_a: float = typer.Option(0.5, help="Zip re-merge damping a."),
    zip_b: float = typer.Option(1.0, help="Zip within-model budget share b."),
    max_sweeps: int = typer.Option(100),
    stop_at: str = typer.Option(
        None, help="Partial merge: merge up to this module path (e.g. layer2); heads stay."
    ),
    stop_after_spaces: int = typer.Option(
        None, help="Partial merge: merge the first K spaces (instead of --stop-at)."
    ),
    device: str = typer.Option("cpu"),
    force: bool = typer.Option(False, help="Replace an existing output directory."),
) -> None:
    """Merge source checkpoints into one model and save it with its merge card."""
    from mudsc.atomic import refuse_existing
    from mudsc.checkpoint import load_checkpoint, save_checkpoint
    from mudsc.data import load_dataset
    from mudsc.evaluate import evaluate
    from mudsc.merge import MergeConfig, merge_models

    refuse_existing(output, force)
    dev = resolve_device(device)
    if stop_at is not None and stop_after_spaces is not None:
        raise MudscError("give either --stop-at or --stop-after-spaces, not both")
    config = MergeConfig(
        method=method, alpha=alpha, seed=seed, repair=repair_mode, zip_a=zip_a, zip_b=zip_b,
        max_sweeps=max_sweeps, device=str(dev),
        stop_at=stop_at if stop_at is not None else stop_after_spaces,
    )  # fmt: skip
    if len(checkpoints) < 2:
        raise MudscError("merge needs at least two checkpoints")
    loaded = [load_checkpoint(p, dev) for p in checkpoints]
    name = data or loaded[0].dataset
    if name is None:
        raise MudscError("the checkpoints record no dataset; pass --data NAME for calibration")
    tasks = [t for ck in loaded for t in ck.tasks]
    dataset = load_dataset(name, data_dir)
    classes = sorted({c for t in tasks for c in t}) or list(range(dataset.num_classes))
    auto = config.preset.dual and config.alpha == "auto"
    batches, held = _calibration(
        dataset, classes, calibration_size, batch_size, seed, config.holdout if auto else None
    )
    head = loaded[0].head
    score_fn = None
    if held is not None and head is not None and tasks:

        def score_fn(candidate: Any) -> float:
            return evaluate(candidate.model, held[0], held[1], tasks, head, dev, batch_size).avg

    with progress_bar() as bar:
        jobs: dict[str, Any] = {}

        def step(stage: str, done: int, total: int) -> None:
            if stage not in jobs:
                jobs[stage] = bar.add_task(stage, total=total, info="")
            bar.update(jobs[stage], completed=done)

        result = merge_models([ck.model for ck in loaded], batches, config, score_fn=score_fn,
                              progress=step)  # fmt: skip
    card = result.card()
    card["sources"] = [str(p) for p in checkpoints]
    card["calibration"] = {"dataset": name, "images": calibration_size, "seed": seed}
    if score_fn is not None:
        card["alpha_score"] = "average per-task accuracy on a held-out labelled slice"
    save_checkpoint(
        output, result.model,
        {
            "kind": "merge", "dataset": name, "tasks": tasks, "merge": card,
            "arch": loaded[0].config["arch"], "arch_args": loaded[0].config.get("arch_args", {}),
        },
        head, force=force,
    )  # fmt: skip
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    chosen = "" if result.alpha is None else f", alpha {result.alpha:g}"
    console.print(f"saved {output} ({method}{chosen}; {timing})")


# commands that live in their own modules register themselves on `app`
import mudsc.cli_experiment  # noqa: E402,F401
import mudsc.cli_plots  # noqa: E402,F401
