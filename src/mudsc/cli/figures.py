"""``mudsc landscape``, ``mudsc diagnose``, ``mudsc interpolate``: figures plus their data.

Each command checks its outputs before any work (nothing is replaced without --force),
loads two source checkpoints, draws calibration images from the training split of their
tasks and evaluation images from the test split, computes, then writes the PNG and a data
file next to it (.npz for the landscape, .json otherwise), both atomically.  Heavy imports
happen inside the commands so that ``mudsc --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import typer
from rich.table import Table

from mudsc.cli.common import (
    check_output,
    console,
    emit_json,
    friendly,
    progress_bars,
    resolve_device,
)
from mudsc.errors import CheckpointError, ConfigError
from mudsc.figure_limits import MAX_RESOLUTION, MAX_STEPS
from mudsc.inputs import existing_directory
from mudsc.methods import METHODS

if TYPE_CHECKING:
    from mudsc.plots.landscape import Landscape

# The methods the figures compare unless told otherwise (the first one sets the frame).
DEFAULT_METHODS = ("zipit", "wzip", "mudsc-zip")


@dataclass
class _Pair:
    """Two loaded source models with what the figures need to score them."""

    models: list[torch.nn.Module]
    head: Any
    tasks: list[list[int]]
    dataset: Any


def _load_pair(a: Path, b: Path, data: str | None, data_dir: Path | None, dev: Any) -> _Pair:
    from mudsc.checkpoint import load_checkpoint
    from mudsc.data import load_dataset

    loaded = [load_checkpoint(p, dev) for p in (a, b)]
    name = data or loaded[0].dataset
    if name is None:
        raise ConfigError("the checkpoints record no dataset; pass --data NAME")
    tasks = [t for ck in loaded for t in ck.tasks]
    if len(tasks) < 1:
        raise CheckpointError(
            f"{a} and {b} record no tasks (class lists); re-train with mudsc train"
        )
    if loaded[0].head is None:
        raise CheckpointError(f"{a} has no class-embedding head (head.safetensors)")
    return _Pair([ck.model for ck in loaded], loaded[0].head, tasks, load_dataset(name, data_dir))


def _batches(pair: _Pair, size: int, batch_size: int, seed: int, dev: Any) -> list[torch.Tensor]:
    """Calibration images from the training split of both tasks' classes."""
    from mudsc.data import draw_calibration

    classes = sorted({c for t in pair.tasks for c in t})
    return draw_calibration(pair.dataset, classes, size, batch_size, seed, dev).batches


def _methods(text: str) -> list[str]:
    """``--methods a,b,c`` as a list, checked against the method registry."""
    from mudsc.plots.interpolate import check_methods

    return check_methods([m.strip() for m in text.split(",") if m.strip()])


def _outputs(output: Path, suffix: str, force: bool, sources: list[Path]) -> tuple[Path, Path]:
    """The PNG and its data file, checked before any work; the sources checked too."""
    from mudsc.plots.style import data_path, refuse_existing_outputs

    check_output(output, sources)
    if output.is_dir():
        raise ConfigError(f"--output {output} is a directory; name the PNG to write")
    for source in sources:
        existing_directory(source, "checkpoint", CheckpointError)
    data_file = data_path(output, suffix)
    refuse_existing_outputs([output, data_file], force)
    return output, data_file


_METHODS_HELP = f"Comma-separated, from: {', '.join(METHODS)}."


_A = typer.Argument(..., help="Source checkpoint A.")
_B = typer.Argument(..., help="Source checkpoint B.")


@friendly
def landscape_command(
    a: Path = _A,
    b: Path = _B,
    output: Path = typer.Option(Path("landscape.png"), "--output", "-o", help="PNG to write."),
    methods: str = typer.Option(
        ",".join(DEFAULT_METHODS), help=f"{_METHODS_HELP} The first sets the frame."
    ),
    resolution: int = typer.Option(
        9, min=2, max=MAX_RESOLUTION, help="Grid points per axis (cost grows as its square)."
    ),
    data_size: int = typer.Option(500, min=1, help="Test images the losses are computed on."),
    calibration_size: int = typer.Option(
        256, min=1, help="Training images for matching and BN reset."
    ),
    alpha: str = typer.Option("0.5", help="MuDSC weight-space share, or 'auto'."),
    data: str = typer.Option(None, "--data", help="Dataset (default: the checkpoints')."),
    data_dir: Path = typer.Option(None),
    batch_size: int = typer.Option(250, min=1),
    seed: int = typer.Option(0, min=0, help="Seed of the image samples."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print the marked points as JSON."),
    force: bool = typer.Option(
        False, "--force", help="Replace outputs mudsc wrote earlier (never other files)."
    ),
) -> None:
    """Contours of every task's loss on the PCA plane of sources, merges and paths."""
    from mudsc.plots.interpolate import EvalSet
    from mudsc.plots.landscape import compute_landscape, plot_landscape
    from mudsc.plots.style import save_figure, save_npz

    png, npz = _outputs(output, ".npz", force, [a, b])
    dev = resolve_device(device)
    chosen = _methods(methods)
    pair = _load_pair(a, b, data, data_dir, dev)
    evalset = EvalSet.sample(pair.dataset, pair.tasks, pair.head, data_size, seed)
    batches = _batches(pair, calibration_size, batch_size, seed, dev)
    with progress_bars() as progress:
        land = compute_landscape(
            pair.models[0], pair.models[1], evalset, batches, chosen, resolution, dev, alpha,
            progress=progress,
        )  # fmt: skip
    save_npz(npz, land.arrays(), force=force)
    save_figure(plot_landscape(land), png, force=force)
    if as_json:
        emit_json({"png": str(png), "data": str(npz), **_landscape_record(land)})
        return
    _print_landscape(land)
    ev = land.plane.explained
    console.print(
        f"plane explains {100 * ev.sum():.0f}% of the points' variance; wrote {png} and {npz}"
    )


def _landscape_record(land: Landscape) -> dict[str, Any]:
    """The landscape's marked points as JSON-ready values (the grid stays in the .npz)."""
    points = [
        {"method": m, "point": r, "loss": dict(zip(land.panel_names, map(float, land.point_loss[i]),
                                                   strict=True)),
         "off_plane": float(land.point_residual[i])}
        for i, (m, r) in enumerate(zip(land.point_methods, land.point_roles, strict=True))
    ]  # fmt: skip
    return {
        "methods": land.methods, "frame": land.frame, "tasks": land.tasks,
        "renorm": land.renorm, "alphas": land.alphas,
        "explained_variance_ratio": [float(x) for x in land.plane.explained],
        "points": points,
    }  # fmt: skip


def _print_landscape(land: Landscape) -> None:
    from mudsc.plots.landscape import landscape_rows

    table = Table(title=f"Marked points ({land.renorm}; loss = cross-entropy, nats)")
    for col in ["method", "point", *land.panel_names, "off-plane distance"]:
        table.add_column(col, justify="left" if col in ("method", "point") else "right")
    for row in landscape_rows(land):
        table.add_row(*row)
    console.print(table)


@friendly
def diagnose_command(
    a: Path = _A,
    b: Path = _B,
    output: Path = typer.Option(Path("diagnose.png"), "--output", "-o", help="PNG to write."),
    methods: str = typer.Option(
        ",".join(DEFAULT_METHODS), help=f"{_METHODS_HELP} The first sets the S_w basis."
    ),
    calibration_size: int = typer.Option(256, min=1, help="Training images for the statistics."),
    alpha: str = typer.Option("0.5", help="MuDSC weight-space share, or 'auto'."),
    data: str = typer.Option(None, "--data", help="Dataset (default: the checkpoints')."),
    data_dir: Path = typer.Option(None),
    batch_size: int = typer.Option(250, min=1),
    seed: int = typer.Option(0, min=0, help="Seed of the image samples."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    force: bool = typer.Option(
        False, "--force", help="Replace outputs mudsc wrote earlier (never other files)."
    ),
) -> None:
    """Per merge space: do weight and activation similarity agree; what did each method match?"""
    from mudsc.plots.diagnose import compute_diagnosis, diagnosis_rows, plot_diagnosis
    from mudsc.plots.style import save_figure, save_json

    png, data_file = _outputs(output, ".json", force, [a, b])
    dev = resolve_device(device)
    chosen = _methods(methods)
    pair = _load_pair(a, b, data, data_dir, dev)
    batches = _batches(pair, calibration_size, batch_size, seed, dev)
    with progress_bars() as progress:
        diag = compute_diagnosis(pair.models[0], pair.models[1], batches, chosen, dev, alpha,
                                 progress=progress)  # fmt: skip
    save_json(data_file, diag.to_dict(), force=force)
    save_figure(plot_diagnosis(diag), png, force=force)
    if as_json:
        emit_json(diag.to_dict())
        return
    table = Table(
        title="Rank agreement of S_w and S_act, and mean similarity of merged pairs",
        caption=f"rho: Spearman over all cross-model pairs, S_w in the {diag.basis} basis; "
        f"pair counts are in {data_file}",
        show_edge=False,
    )
    table.add_column("space", no_wrap=True)
    table.add_column("n", justify="right")
    table.add_column("rho", justify="right", min_width=5)
    for m in diag.methods:
        head = m.replace("-", "-\n")  # mudsc-zip -> two short header lines
        table.add_column(f"{head}\nS_act", justify="right", min_width=5, overflow="fold")
        table.add_column(f"{head}\nS_w", justify="right", min_width=5, overflow="fold")
    for row in diagnosis_rows(diag):
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {png} and {data_file}")


@friendly
def interpolate_command(
    a: Path = _A,
    b: Path = _B,
    method: str = typer.Option("mudsc-zip", help="Method whose merged basis aligns A and B."),
    steps: int = typer.Option(
        11, min=2, max=MAX_STEPS, help="Points on the path, end points included."
    ),
    output: Path = typer.Option(Path("interpolate.png"), "--output", "-o", help="PNG to write."),
    data_size: int = typer.Option(500, min=1, help="Test images the losses are computed on."),
    calibration_size: int = typer.Option(
        256, min=1, help="Training images for matching and BN reset."
    ),
    alpha: str = typer.Option("0.5", help="MuDSC weight-space share, or 'auto'."),
    data: str = typer.Option(None, "--data", help="Dataset (default: the checkpoints')."),
    data_dir: Path = typer.Option(None),
    batch_size: int = typer.Option(250, min=1),
    seed: int = typer.Option(0, min=0, help="Seed of the image samples."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print the path's values as JSON."),
    force: bool = typer.Option(
        False, "--force", help="Replace outputs mudsc wrote earlier (never other files)."
    ),
) -> None:
    """Loss and accuracy per task along the straight path A -> B: naive, aligned, renormalised."""
    from mudsc.plots.interpolate import (
        EvalSet,
        compute_interpolation,
        interpolation_rows,
        plot_interpolation,
    )
    from mudsc.plots.style import save_figure, save_json

    png, data_file = _outputs(output, ".json", force, [a, b])
    dev = resolve_device(device)
    pair = _load_pair(a, b, data, data_dir, dev)
    evalset = EvalSet.sample(pair.dataset, pair.tasks, pair.head, data_size, seed)
    batches = _batches(pair, calibration_size, batch_size, seed, dev)
    with progress_bars() as progress:
        interp = compute_interpolation(pair.models[0], pair.models[1], evalset, batches, method,
                                       steps, dev, alpha, progress=progress)  # fmt: skip
    save_json(data_file, interp.to_dict(), force=force)
    save_figure(plot_interpolation(interp), png, force=force)
    if as_json:
        emit_json({"png": str(png), "data": str(data_file), **interp.to_dict()})
        return
    table = Table(
        title="Mean over tasks along the path A -> B (loss in nats, accuracy in %)",
        caption=f"aligned = both models in the {interp.method} merged basis",
    )
    table.add_column("t", justify="right")
    for v in interp.variants:
        short = v.replace("renorm", interp.renorm)
        table.add_column(f"{short}\nloss", justify="right")
        table.add_column(f"{short}\nacc", justify="right")
    for row in interpolation_rows(interp):
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {png} and {data_file}")
