"""``mudsc eval``: joint, per-task and average accuracy of one model or an ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mudsc.cli.common import console, friendly, report_table, resolve_device
from mudsc.errors import MudscError


def parse_tasks(text: str | None) -> list[list[int]] | None:
    """``'0,1,2;3,4,5'`` as class lists (None when not given)."""
    if not text:
        return None
    from mudsc.data import parse_classes

    return [parse_classes(part) for part in text.split(";") if part.strip()]


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
    task_lists = parse_tasks(tasks)
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
