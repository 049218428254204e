"""What every command shares: one-line user errors, device checks, progress bars, tables.

Every user mistake surfaces as a :class:`MudscError`, printed as one line on stderr with
exit code 2; the library itself never prints.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from mudsc.errors import MudscError
from mudsc.progress import Progress

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


def parse_arch_args(text: str | None) -> dict[str, Any]:
    """``--arch-args '{"width": 4}'`` as a dict (empty when not given)."""
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


class StageBars:
    """The library's :class:`~mudsc.progress.Progress` shown as rich bars, one per stage."""

    def __init__(self, bar: RichProgress) -> None:
        self.bar = bar
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total, info=info)
        self.bar.update(self.tasks[stage], completed=done, total=total, info=info)


@contextmanager
def progress_bars() -> Iterator[Progress]:
    """``with progress_bars() as progress: library_call(..., progress=progress)``."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with RichProgress(*columns, console=err_console, transient=False) as bar:
        yield StageBars(bar)


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
