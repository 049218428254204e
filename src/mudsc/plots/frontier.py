"""The partial-merge frontier: merged accuracy against the cost of the merged model.

A partial merge keeps one head per source after its stop point, so it costs more than one
model and less than the ensemble; these points, with the full merge (cost 1) and the
ensemble (cost N), show how much accuracy each extra parameter or FLOP buys back.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mudsc.plots.style import method_color, new_figure

ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class FrontierPoint:
    """One row of a study: its method (or the ensemble), label, costs and accuracies."""

    method: str
    label: str
    params: float
    flops: float
    joint: tuple[float, float]  # mean, std (fractions)
    avg: tuple[float, float]


def frontier_points(summary: Mapping[str, Mapping[str, Any]], n_models: int) -> list[FrontierPoint]:
    """The full merges of the top-level settings and every partial merge (rows costing more
    than one model), plus the ensemble at N times one model; other variants' full merges
    would all sit at cost 1 and are left out."""
    points = []
    for name, row in summary.items():
        if name == ENSEMBLE:
            params = flops = float(n_models)
        elif "params" in row and "flops" in row:
            params, flops = row["params"]["mean"], row["flops"]["mean"]
        else:
            continue
        method, _, label = name.partition(" @ ")
        if label and params <= 1.0 + 1e-6:
            continue
        joint = (row["joint"]["mean"], row["joint"]["std"])
        avg = (row["avg"]["mean"], row["avg"]["std"])
        points.append(FrontierPoint(method, label, params, flops, joint, avg))
    return points


def has_partial(points: list[FrontierPoint]) -> bool:
    """Whether any merged row costs more than one model (a partial merge)."""
    return any(p.method != ENSEMBLE and p.params > 1.0 + 1e-6 for p in points)


def frontier_png(points: list[FrontierPoint], title: str) -> bytes:
    """Joint (solid) and average per-task (dashed) accuracy against parameters and FLOPs
    relative to one model; one colour per method, its points joined in order of cost."""
    fig = new_figure(11.0, 4.5)
    axes = fig.subplots(1, 2, sharey=True)
    ensemble = [p for p in points if p.method == ENSEMBLE]
    methods = sorted({p.method for p in points} - {ENSEMBLE})
    for ax, cost in zip(axes, ("params", "flops"), strict=True):
        for method in methods:
            mine = sorted((p for p in points if p.method == method), key=lambda p: getattr(p, cost))
            xs = [getattr(p, cost) for p in mine]
            for metric, style in (("joint", "-"), ("avg", "--")):
                ys = [100 * getattr(p, metric)[0] for p in mine]
                errs = [100 * getattr(p, metric)[1] for p in mine]
                ax.errorbar(xs, ys, yerr=errs, fmt=style + "o", color=method_color(method),
                            capsize=3, markersize=4, label=f"{method} {metric}")  # fmt: skip
        for p in ensemble:
            ax.plot([getattr(p, cost)] * 2, [100 * p.joint[0], 100 * p.avg[0]], "k*",
                    markersize=10, label="ensemble (joint, avg)")  # fmt: skip
        ax.set_xlabel(f"{'parameters' if cost == 'params' else 'forward FLOPs'} / one model")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
