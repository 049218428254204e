"""``mudsc demo``: train two small models on the embedded MNIST subset, then merge them."""

from __future__ import annotations

import time

import typer

from mudsc.cli.common import (
    console,
    emit_json,
    friendly,
    progress_bars,
    report_table,
    resolve_device,
)


@friendly
def demo_command(
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """Train two small models on disjoint halves of the embedded MNIST subset, then merge them."""
    from mudsc.demo import run_demo

    dev = resolve_device(device)
    start = time.perf_counter()
    with progress_bars() as progress:
        result = run_demo(dev, progress=progress)
    if as_json:
        emit_json({"rows": result["rows"], "tasks": result["tasks"]})
        return
    console.print(report_table(result["title"], result["rows"]))
    console.print(f"total {time.perf_counter() - start:.1f} s")
