"""``mudsc experiment CONFIG.yaml``: the paper's protocol end to end, with progress and tables."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from mudsc.cli.common import (
    check_output,
    console,
    emit_json,
    friendly,
    progress_bars,
    report_table,
    resolve_device,
)
from mudsc.errors import ConfigError
from mudsc.inputs import regular_file


def _summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, s in results["summary"].items():
        row = {
            "method": name,
            "joint": s["joint"]["mean"],
            "per_task": [t["mean"] for t in s["per_task"]],
            "avg": s["avg"]["mean"],
        }
        if "seconds" in s:
            row["seconds"] = s["seconds"]["mean"]
        if "alpha" in s:
            row["alpha"] = ", ".join(f"{a:g}" for a in s["alpha"]["values"])
        rows.append(row)
    return rows


def _hetero_table(results: dict[str, Any]) -> Table:
    tasks = list(results["tasks"])
    table = Table(title=f"{results['name']}: scaled performance x100 (mean over pairs)")
    for col in ("method", *tasks, "mean", "merge s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for method, s in results["summary"].items():
        cells = [f"{100 * s['per_task'][t]['mean']:.1f}" if t in s["per_task"] else ""
                 for t in tasks]  # fmt: skip
        table.add_row(method, *cells, f"{100 * s['mean']['mean']:.1f}",
                      f"{s['seconds']['mean']:.1f}")  # fmt: skip
    return table


@friendly
def experiment_command(
    config: Path = typer.Argument(..., help="Experiment config (YAML); see configs/."),
    output: Path = typer.Option(
        None, "--output", "-o", help="Output folder (default: the config's output_dir)."
    ),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Redo everything instead of reusing finished work (only in a folder mudsc made).",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate the config against the dataset and stop."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the results as JSON on stdout (progress on stderr)."
    ),
) -> None:
    """Train (or reuse) model pairs, merge them with every method, evaluate and report.

    Interrupted runs resume: finished checkpoints and merge results are reused.
    """
    from mudsc.experiments import check_experiment, load_config, run_experiment
    from mudsc.experiments.config import check_output_dir

    regular_file(config, "experiment config", ConfigError)
    if output is not None:
        check_output(output)
    cfg = load_config(config)
    if output is None:
        check_output(Path(cfg.output_dir))
    else:
        cfg = replace(cfg, output_dir=check_output_dir(str(output), Path(config).parent))
    dev = resolve_device(device)
    if dry_run:
        plan = check_experiment(cfg)
        if as_json:
            emit_json({"config": str(config), "valid": True, "plan": plan})
        else:
            console.print(f"{config}: valid; {plan}")
        return
    start = time.perf_counter()
    with progress_bars() as progress:
        results = run_experiment(cfg, dev, force=force, progress=progress)
    out = Path(cfg.output_dir)
    seconds = time.perf_counter() - start
    if as_json:
        emit_json({"output_dir": str(out), "seconds": seconds, "results": results})
        return
    if cfg.kind == "hetero":
        console.print(_hetero_table(results))
    else:
        title = f"{cfg.name}: mean over {len(results['pairs'])} pair(s), accuracy %"
        console.print(report_table(title, _summary_rows(results)))
    console.print(
        f"wrote {out / 'results.md'}, results.csv, results.json, results.png ({seconds:.0f} s)"
    )
