"""``mudsc experiment CONFIG.yaml``: the paper's protocol end to end, with progress and tables."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from mudsc.cli import app, console, friendly, progress_bar, report_table, resolve_device


def _progress(bar: Any) -> Any:
    jobs: dict[str, Any] = {}

    def step(stage: str, done: int, total: int, info: str = "") -> None:
        if stage not in jobs:
            jobs[stage] = bar.add_task(stage, total=total, info="")
        bar.update(jobs[stage], completed=done, total=total, info=info)

    return step


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


@app.command()
@friendly
def experiment(
    config: Path = typer.Argument(..., help="Experiment config (YAML); see configs/."),
    output: Path = typer.Option(
        None, "--output", "-o", help="Output folder (default: the config's output_dir)."
    ),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N."),
    force: bool = typer.Option(False, help="Redo everything instead of reusing finished work."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate the config against the dataset and stop."
    ),
) -> None:
    """Train (or reuse) model pairs, merge them with every method, evaluate and report.

    Interrupted runs resume: finished checkpoints and merge results are reused.
    """
    from mudsc.experiment import check_against_dataset, prepare_dataset, run_experiment
    from mudsc.experiment_config import load_config
    from mudsc.hetero import check_hetero, run_hetero

    cfg = load_config(config)
    if output is not None:
        cfg = replace(cfg, output_dir=str(output))
    dev = resolve_device(device)
    hetero = cfg.kind == "hetero"
    if dry_run:
        data = prepare_dataset(cfg)
        if hetero:
            check_hetero(cfg, data)
            console.print(f"{config}: valid; encoder pairs {list(cfg.hetero.task_pairs)}")
        else:
            splits = check_against_dataset(cfg, data)
            console.print(f"{config}: valid; {cfg.pairs} pair(s), class splits {splits}")
        return
    start = time.perf_counter()
    with progress_bar() as bar:
        run = run_hetero if hetero else run_experiment
        results = run(cfg, dev, force=force, progress=_progress(bar))
    out = Path(cfg.output_dir)
    if hetero:
        console.print(_hetero_table(results))
    else:
        title = f"{cfg.name}: mean over {len(results['pairs'])} pair(s), accuracy %"
        console.print(report_table(title, _summary_rows(results)))
    console.print(
        f"wrote {out / 'results.md'}, results.csv, results.json, results.png "
        f"({time.perf_counter() - start:.0f} s)"
    )
