"""``mudsc merge``: source checkpoints in, one merged checkpoint with its merge card out.

The merge knobs are :class:`~mudsc.merge.MergeConfig`'s fields, turned into options by
:func:`~mudsc.cli.options.config_options`; ``--method`` lists the method registry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import typer

from mudsc.cli.common import console, friendly, progress_bars, resolve_device
from mudsc.cli.options import config_options
from mudsc.errors import MudscError
from mudsc.merge import MergeConfig
from mudsc.methods import METHODS


def method_help() -> str:
    """``--method`` help, generated from the registry: every method with its description
    and reference."""
    return "; ".join(f"{name}: {m.description} ({m.reference})" for name, m in METHODS.items())


def _held_out_score(
    held: tuple[torch.Tensor, torch.Tensor] | None,
    head: Any,
    tasks: list[list[int]],
    device: torch.device,
    batch_size: int,
) -> Callable[[Any], float] | None:
    """Score of an alpha candidate: average per-task accuracy on the held-out slice."""
    if held is None or head is None or not tasks:
        return None
    from mudsc.evaluate import evaluate

    def score(candidate: Any) -> float:
        return evaluate(candidate.model, held[0], held[1], tasks, head, device, batch_size).avg

    return score


def _stop_at(stop_at: str | None, stop_after_spaces: int | None) -> str | int | None:
    if stop_at is not None and stop_after_spaces is not None:
        raise MudscError("give either --stop-at or --stop-after-spaces, not both")
    return stop_at if stop_at is not None else stop_after_spaces


@friendly
@config_options(
    MergeConfig, into="settings", skip={"alpha_grid", "device", "stop_at"},
    types={"alpha": str}, helps={"method": method_help()}, panel="Merge settings",
)  # fmt: skip
def merge_command(
    checkpoints: list[Path] = typer.Argument(..., help="Two or more source checkpoints."),
    output: Path = typer.Option(..., "--output", "-o", help="Merged checkpoint directory."),
    data: str = typer.Option(
        None, "--data", help="Calibration dataset (default: the checkpoints')."
    ),
    data_dir: Path = typer.Option(None),
    calibration_size: int = typer.Option(1000, help="Calibration images (labels unused)."),
    batch_size: int = typer.Option(250),
    stop_at: str = typer.Option(
        None, help="Partial merge: merge up to this module path (e.g. layer2); heads stay."
    ),
    stop_after_spaces: int = typer.Option(
        None, help="Partial merge: merge the first K spaces (instead of --stop-at)."
    ),
    device: str = typer.Option("cpu"),
    force: bool = typer.Option(False, help="Replace an existing output directory."),
    *,
    settings: dict[str, Any],
) -> None:
    """Merge source checkpoints into one model and save it with its merge card."""
    from mudsc.atomic import refuse_existing
    from mudsc.checkpoint import load_checkpoint, save_checkpoint
    from mudsc.data import draw_calibration, load_dataset
    from mudsc.merge import merge_models

    refuse_existing(output, force)
    dev = resolve_device(device)
    config = MergeConfig(**settings, device=str(dev), stop_at=_stop_at(stop_at, stop_after_spaces))
    if len(checkpoints) < 2:
        raise MudscError("merge needs at least two checkpoints")
    loaded = [load_checkpoint(p, dev) for p in checkpoints]
    name = data or loaded[0].dataset
    if name is None:
        raise MudscError("the checkpoints record no dataset; pass --data NAME for calibration")
    tasks = [t for ck in loaded for t in ck.tasks]
    dataset = load_dataset(name, data_dir)
    classes = sorted({c for t in tasks for c in t}) or list(range(dataset.num_classes))
    auto = METHODS[config.method].uses_alpha and config.alpha == "auto"
    calibration = draw_calibration(dataset, classes, calibration_size, batch_size, config.seed,
                                   dev, holdout=config.holdout if auto else None)  # fmt: skip
    batches, held = calibration.batches, calibration.held
    head = loaded[0].head
    score_fn = _held_out_score(held, head, tasks, dev, batch_size)
    with progress_bars() as progress:
        result = merge_models([ck.model for ck in loaded], batches, config, score_fn=score_fn,
                              progress=progress)  # fmt: skip
    card = result.card()
    card["sources"] = [str(p) for p in checkpoints]
    card["calibration"] = {"dataset": name, "images": calibration_size, "seed": config.seed}
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
    console.print(f"saved {output} ({config.method}{chosen}; {timing})")
