"""What every command shares: one-line user errors, device checks, progress bars, tables.

Every user mistake surfaces as a :class:`MudscError`, printed as one line on stderr with
exit code 2; an operating-system refusal that escapes the library (disk full, read-only,
permission denied) is one line with exit code 1; the library itself never prints.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from mudsc.errors import ConfigError, MudscError
from mudsc.progress import Progress

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


# What to do about the operating-system refusals a run can meet (by errno).
_OS_FIXES = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "the location is read-only; write elsewhere",
    errno.EACCES: "check the permissions or write elsewhere",
    errno.EPERM: "check the permissions or write elsewhere",
    errno.ELOOP: "a symlink loops; point it at a real file",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "name a file, not a directory",
}


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: the file it concerns, the system's reason and the fix."""
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    where = f"{' -> '.join(names)}: " if names else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = _OS_FIXES.get(exc.errno or 0)
    return f"{where}{reason}" + (f"; {fix}" if fix else "")


def print_error(line: str) -> None:
    """One error line on stderr, never wrapped (scripts and tests read it whole)."""
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


def friendly(fn: F) -> F:
    """Turn MudscError (exit 2), an escaped OSError (exit 1) and Ctrl-C (exit 130) into one
    clear line; any other exception is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MudscError as exc:
            print_error(str(exc))
            raise typer.Exit(2) from None
        except OSError as exc:
            print_error(os_error_line(exc))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; finished outputs are kept, partial ones removed")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


_DEVICE = re.compile(r"(cpu|mps|cuda)(:(\d+))?")


def resolve_device(name: str) -> torch.device:
    """Check that the asked-for device is one mudsc runs on and exists, before any work."""
    match = _DEVICE.fullmatch(name.strip())
    if match is None:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(3)
    if kind == "cpu" and index not in (None, "0"):
        raise ConfigError(f"--device {name}: there is one cpu device; use --device cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {name} was asked for but no CUDA GPU is available; use --device cpu"
            )
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}")  # fmt: skip
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name} was asked for but MPS is not available; "
                          "use --device cpu")  # fmt: skip
    return torch.device(name.strip())


def _forms(path: Path) -> set[Path]:
    """A path as written (made absolute) and with its symlinks resolved."""
    return {Path(os.path.abspath(path)), Path(os.path.realpath(path))}


def _holds(outer: Path, inner: Path) -> bool:
    """Whether ``outer`` is ``inner`` or one of its parents, in any form of either."""
    return any(o == i or o in i.parents for o in _forms(outer) for i in _forms(inner))


def check_output(output: Path, inputs: Iterable[Path] = ()) -> Path:
    """Refuse an output that is the current directory, one of its parents, or a directory
    holding an input: replacing it would wipe the user's files (``-o .``, ``-o ""``)."""
    if str(output).strip() in ("", "."):
        raise ConfigError("--output is the current directory; name a new path, e.g. -o merged")
    if _holds(output, Path.cwd()):
        raise ConfigError(f"--output {output} is the current directory or one of its parents; "
                          "name a new path, e.g. -o merged")  # fmt: skip
    for path in inputs:
        if _holds(output, path):
            raise ConfigError(f"--output {output} holds the input {path}; writing there would "
                              "replace it, name a new path")  # fmt: skip
    return output


def parse_arch_args(text: str | None) -> dict[str, Any]:
    """``--arch-args '{"width": 4}'`` as a dict (empty when not given)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--arch-args must be a JSON object, e.g. '{{\"width\": 4}}': {exc}"
        ) from exc
    if not isinstance(value, dict):
        raise ConfigError("--arch-args must be a JSON object, e.g. '{\"width\": 4}'")
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


def emit_json(value: Any) -> None:
    """``--json``: the result as one JSON document, the only thing written to stdout."""
    sys.stdout.write(json.dumps(value) + "\n")
