"""``mudsc eval``: joint, per-task and average accuracy of one model or an ensemble; the
accuracy of a Hugging Face classifier on a labelled file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer

from mudsc import distributed
from mudsc.cli.common import console, friendly, report_table, resolve_device
from mudsc.data.files import TensorFile, read_tensor_file
from mudsc.errors import CheckpointError, ConfigError
from mudsc.inputs import existing_directory, regular_file


def parse_tasks(text: str | None) -> list[list[int]] | None:
    """``'0,1,2;3,4,5'`` as class lists (None when not given)."""
    if not text:
        return None
    from mudsc.data import parse_classes

    return [parse_classes(part) for part in text.split(";") if part.strip()]


@friendly
@distributed.launched
def eval_command(
    checkpoints: list[Path] = typer.Argument(
        ..., help="One checkpoint, or several for an ensemble; or one Hugging Face directory."
    ),
    dataset: str = typer.Option(
        None, help="Dataset (default: the one recorded in the checkpoint)."
    ),
    data_dir: Path = typer.Option(None),
    data_file: Path = typer.Option(
        None,
        "--data-file",
        help="Score on a labelled file instead of a dataset's test set (required for Hugging "
        "Face models): inputs as the model takes them and integer labels, in .pt, "
        ".safetensors or .npz (keys inputs, labels).",
    ),
    tasks: str = typer.Option(None, help="Tasks as class lists, e.g. '0,1,2;3,4,5'."),
    batch_size: int = typer.Option(500, min=1),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Joint, per-task and average accuracy of one model or an ensemble (for a Hugging
    Face classifier: the accuracy of argmax(logits) on --data-file)."""
    from mudsc.hf import is_hf_directory

    dev = distributed.local_device(resolve_device(device))
    labelled = _checked_inputs(checkpoints, data_file)
    if any(is_hf_directory(p) for p in checkpoints):
        _eval_hf(checkpoints, labelled, batch_size, dev, as_json)
        return
    from mudsc.checkpoint import load_checkpoint
    from mudsc.evaluate import evaluate

    loaded = [load_checkpoint(p, dev) for p in checkpoints]
    task_lists = parse_tasks(tasks)
    if task_lists is None:
        task_lists = [t for ck in loaded for t in ck.tasks]
    if not task_lists:
        raise ConfigError("the checkpoints record no tasks; pass --tasks '0,1,2;3,4,5'")
    head = loaded[0].head
    if head is None:
        raise CheckpointError(f"{checkpoints[0]} has no class-embedding head (head.safetensors)")
    if labelled is None:
        title, images, labels = _test_set(dataset or loaded[0].dataset, data_dir)
    else:
        title, images, labels = str(labelled.path), labelled.inputs, labelled.labels
    models = [ck.model for ck in loaded]
    report = evaluate(models if len(models) > 1 else models[0], images, labels,
                      task_lists, head, dev, batch_size)  # fmt: skip
    if not distributed.is_root():
        return
    label = "ensemble" if len(models) > 1 else str(checkpoints[0])
    row = {"method": label, **report.to_dict()}
    if as_json:
        console.print_json(json.dumps(row))
    else:
        console.print(report_table(f"{title} ({report.n_images} images)", [row]))


def _checked_inputs(checkpoints: list[Path], data_file: Path | None) -> TensorFile | None:
    """Check every path before any model is loaded; the labelled file when one is given."""
    for path in checkpoints:
        existing_directory(path, "checkpoint", CheckpointError)
    if data_file is None:
        return None
    return read_tensor_file(regular_file(data_file, "--data-file"), labelled=True)


def _test_set(name: str | None, data_dir: Path | None) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A dataset's normalised test images and labels, with the table's title."""
    from mudsc.data import load_dataset

    if name is None:
        raise ConfigError("the checkpoint records no dataset; pass --dataset or --data-file")
    data = load_dataset(name, data_dir)
    return f"{name} test set", data.normalize(data.test_images), data.test_labels


def _eval_hf(
    paths: list[Path],
    labelled: TensorFile | None,
    batch_size: int,
    device: torch.device,
    as_json: bool,
) -> None:
    """Accuracy of one Hugging Face classifier (argmax of its logits) on the labelled file."""
    from mudsc.hf import accuracy, load_hf_model

    if len(paths) != 1:
        raise ConfigError("eval scores one Hugging Face model at a time; pass one directory")
    if labelled is None:
        raise ConfigError("scoring a Hugging Face model needs --data-file FILE with inputs "
                          "and labels (.pt, .safetensors or .npz)")  # fmt: skip
    model = load_hf_model(paths[0], device)
    score = accuracy(model, labelled.inputs, labelled.labels, batch_size, device)
    row = {"model": str(paths[0]), "accuracy": score, "examples": len(labelled)}
    if as_json:
        console.print_json(json.dumps(row))
        return
    console.print(f"{paths[0]}: accuracy {100 * score:.1f}% on {len(labelled)} examples "
                  f"of {labelled.path}")  # fmt: skip
