"""``mudsc train``: one source model on one task's classes, saved as a checkpoint.

The training hyper-parameters are :class:`~mudsc.train.TrainConfig`'s fields, turned into
options by :func:`~mudsc.cli.options.config_options` (names, defaults and help live there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer

from mudsc.cli.common import (
    check_output,
    console,
    friendly,
    parse_arch_args,
    progress_bars,
    resolve_device,
)
from mudsc.cli.options import config_options
from mudsc.errors import ConfigError
from mudsc.inputs import regular_file
from mudsc.train import TrainConfig


def _classes(num_classes: int, task: str | None, split: str | None, split_seed: int,
             task_index: int) -> list[int]:  # fmt: skip
    """The class ids to train on: --task, one part of --split, or all classes."""
    from mudsc.data import parse_classes, parse_split, split_classes, validate_classes

    if task and split:
        raise ConfigError("give either --task or --split, not both")
    if split:
        parts = split_classes(num_classes, parse_split(split), split_seed)
        if not 0 <= task_index < len(parts):
            raise ConfigError(f"--task-index must be in 0..{len(parts) - 1} for split {split}")
        classes = parts[task_index]
    else:
        classes = parse_classes(task) if task else list(range(num_classes))
    return validate_classes(classes, num_classes)


@friendly
@config_options(
    TrainConfig, into="settings", panel="Training settings",
    ranges={"epochs": (1, None), "batch_size": (1, None), "momentum": (0, 1),
            "weight_decay": (0, None), "warmup_epochs": (0, None), "crop_padding": (0, None),
            "seed": (0, None)},
)  # fmt: skip
def train_command(
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint directory to write."),
    arch: str = typer.Option("resnet20", help="Architecture name (see `mudsc spec --list`)."),
    width: float = typer.Option(None, help="Width multiplier (architectures that have one)."),
    arch_args: str = typer.Option(None, help="Extra architecture arguments as JSON."),
    dataset: str = typer.Option("fashion-mnist", help="Dataset name."),
    data_dir: Path = typer.Option(None, help="Where the dataset files are."),
    task: str = typer.Option(None, help="Class ids, e.g. 0,2,4,6,8 (default: all classes)."),
    split: str = typer.Option(None, help="Random split like 5+5; use with --task-index."),
    split_seed: int = typer.Option(0, min=0, help="Seed of the random class split."),
    task_index: int = typer.Option(0, min=0, help="Which part of --split to train on."),
    embed_dim: int = typer.Option(
        512, min=1, max=65536, help="Dimension of the shared class embeddings."
    ),
    head_seed: int = typer.Option(0, min=0, help="Seed of the orthonormal class embeddings."),
    class_embeddings: Path = typer.Option(None, help="File of class embeddings (C x D)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing output that mudsc wrote."
    ),
    *,
    settings: dict[str, Any],
) -> None:
    """Train a source model on one task's classes and save it as a checkpoint."""
    from mudsc.atomic import refuse_existing
    from mudsc.checkpoint import save_checkpoint
    from mudsc.data import load_dataset
    from mudsc.models import MODELS
    from mudsc.models.head import ClassEmbeddingHead
    from mudsc.train import train, train_config_dict

    check_output(output, [class_embeddings] if class_embeddings else [])
    refuse_existing(output, force)
    dev = resolve_device(device)
    if width is not None and not width > 0:
        raise ConfigError(f"--width must be positive, got {width}")
    if class_embeddings is not None:
        regular_file(class_embeddings, "--class-embeddings")
    MODELS.get(arch)  # an unknown name fails here, before the (slow) dataset load
    config = TrainConfig(**settings)
    data = load_dataset(dataset, data_dir)
    classes = _classes(data.num_classes, task, split, split_seed, task_index)
    head = (
        ClassEmbeddingHead.from_file(class_embeddings)
        if class_embeddings
        else ClassEmbeddingHead.orthonormal(data.num_classes, embed_dim, head_seed)
    )
    extra = parse_arch_args(arch_args)
    if width is not None:
        extra["width"] = width
    with progress_bars() as progress:
        result = train(arch, data, classes, head, config, extra, dev, progress=progress,
                       stage=f"train {arch}")  # fmt: skip
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
