"""What every experiment report shares: mean ± std, Markdown tables, bar charts, the machine."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mudsc.atomic import atomic_write_bytes, atomic_write_text


@dataclass(frozen=True)
class Chart:
    """Grouped bars: one group per name, one bar per series (means, stds)."""

    title: str
    names: list[str]
    series: dict[str, tuple[list[float], list[float]]]
    ylabel: str
    ylim: tuple[float, float] | None = (0, 100)


@dataclass(frozen=True)
class ReportFiles:
    """The text of results.md and results.csv and the chart of results.png."""

    markdown: str
    csv: str
    chart: Chart
    figures: dict[str, bytes] = field(default_factory=dict)  # further PNGs, by file name


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std}


def pct(ms: dict[str, float]) -> str:
    """A mean ± std of fractions, as percent with one decimal."""
    return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}"


def md_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def machine_info(device: Any) -> dict[str, Any]:
    """Where the numbers came from: CPU model, core count, torch, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "device": str(device),
    }  # fmt: skip
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(machine: dict[str, Any]) -> str:
    """One sentence naming the machine, for the foot of a report."""
    gpu = f" ({machine['gpu']})" if "gpu" in machine else ""
    return (
        f"Machine: {machine['cpu']}, {machine['nproc']} cores, device {machine['device']}"
        f"{gpu}, torch {machine['torch']}."
    )


def png_bytes(chart: Chart) -> bytes:
    """The chart rendered as PNG (matplotlib imported late: only reports need it)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(chart.names) + 2), 4.5))
    width = 0.8 / len(chart.series)
    for s, (label, (means, stds)) in enumerate(chart.series.items()):
        xs = [i + (s - (len(chart.series) - 1) / 2) * width for i in range(len(chart.names))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(range(len(chart.names)))
    ax.set_xticklabels(chart.names, rotation=30, ha="right")
    ax.set_ylabel(chart.ylabel)
    ax.set_title(chart.title)
    if chart.ylim:
        ax.set_ylim(*chart.ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_report(out: Path, results_json: str, files: ReportFiles) -> None:
    """results.json, results.csv, results.md and results.png, each written atomically."""
    atomic_write_text(out / "results.json", results_json)
    atomic_write_text(out / "results.csv", files.csv)
    atomic_write_text(out / "results.md", files.markdown)
    atomic_write_bytes(out / "results.png", png_bytes(files.chart))
    for name, png in files.figures.items():
        atomic_write_bytes(out / name, png)
