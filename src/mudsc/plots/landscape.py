"""Loss landscape around merged models (docs/ALGORITHM.md section 8, last item).

What is drawn
-------------
Merge A and B with every requested method.  For each method m take three parameter
vectors, all expressed in m's merged basis with ``mudsc.apply.transform_state``: source A,
source B and the merged model; the straight path between the two sources passes through
the merge (before normalisation repair, the merge *is* the midpoint).  All vectors go
through a PCA; the grid spans the plane of the first two components; at every grid point
each task's loss is evaluated (cross-entropy over that task's classes, cosine logits x
100) after re-estimating normalisation statistics.

The common frame
----------------
Each method has its own merged basis (unit k of merged model m is a different mix of
source units than unit k of merged model m'), so their vectors cannot be compared raw.
The *frame* is the merged basis of the first method.  Every other method's points are
moved into it by one permutation per space, found by Git Re-Basin weight matching of
that method's merged model to the frame method's merged model (``rebasin`` with the
two merged models as inputs).  A permutation is a symmetry of the network, so every
point keeps its function and its loss, and the distances among one method's points are
unchanged; only the relative placement of different methods depends on how well their
merged models can be permuted onto each other.  Zip merges are not permutations of the
sources, so "source A in m's basis" is the lossy projection of A onto m's merged units
(its loss may be well above A's own); for permutation methods it is A exactly.

Where the merged model sits
---------------------------
The merged point is the merge's weights *before* normalisation repair, i.e. the mean of
the two transformed sources (``mudsc.apply.apply_matches``), the midpoint of its path.
For BatchNorm networks these are exactly the merged model's parameters (the BN reset
changes buffers only).  REPAIR folds per-channel rescalings into the weights; it is
treated like the BN reset, as the renormalisation applied at *every* point of the plane,
not as a move of the merged point (otherwise its rescaling would dominate the PCA).

How a parameter vector becomes a model
--------------------------------------
Only ``named_parameters`` enter the vectors.  Buffers come from the frame's merged model;
BatchNorm statistics are then re-estimated on the calibration batches (one pass), or,
for networks without BatchNorm, REPAIR targets the frame method's source statistics
through its matches.  The marked points are evaluated with the same procedure at their
exact parameters (``point_loss``); the contour at a marked point is the loss of its
projection onto the plane, which differs by how far the point lies off the plane
(``point_residual``, reported).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter
from torch import Tensor, nn

from mudsc.apply import apply_matches, transform_state
from mudsc.errors import CheckpointError, ConfigError, DataError, SpecError
from mudsc.figure_limits import MAX_RESOLUTION, MAX_STEPS
from mudsc.inputs import regular_file
from mudsc.merge import MergeConfig, MergeResult, merge_models
from mudsc.modes import eval_mode
from mudsc.plots.interpolate import (
    EvalSet,
    Renormaliser,
    check_count,
    check_methods,
    merge_every_method,
    model_with_state,
    renormaliser_for,
    source_states,
    task_metrics,
)
from mudsc.plots.style import POINT_MARKERS, method_color, new_figure
from mudsc.progress import Progress, counted
from mudsc.spaces import MergeSpec

log = logging.getLogger(__name__)
ROLES = ("source A", "source B", "merged")


# -- pure geometry ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plane:
    """A 2-D affine plane in parameter space: ``center + u * basis[0] + v * basis[1]``."""

    center: np.ndarray
    basis: np.ndarray
    explained: np.ndarray

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """(k, D) vectors -> (k, 2) plane coordinates (orthogonal projection)."""
        return (np.atleast_2d(vectors) - self.center) @ self.basis.T

    def point(self, u: float, v: float) -> np.ndarray:
        return self.center + u * self.basis[0] + v * self.basis[1]

    def residual(self, vectors: np.ndarray) -> np.ndarray:
        """Distance of each vector from the plane (what the projection throws away)."""
        x = np.atleast_2d(vectors) - self.center
        return np.linalg.norm(x - (x @ self.basis.T) @ self.basis, axis=1)


def pca_plane(vectors: np.ndarray) -> Plane:
    """The plane of the first two principal components of k >= 3 vectors.

    Signs are fixed so that each component's largest-magnitude entry is positive (the
    result does not depend on the SVD routine).  With fewer than two directions of
    variance the missing component is an arbitrary orthonormal direction (explained 0).
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise DataError(f"a PCA plane needs at least 3 vectors, got shape {x.shape}")
    if x.shape[1] < 2:
        raise DataError("a PCA plane needs vectors of dimension at least 2")
    center = x.mean(axis=0)
    _, s, vh = np.linalg.svd(x - center, full_matrices=False)
    basis = vh[:2].copy()
    if basis.shape[0] < 2:  # only reachable with D == 1, excluded above
        raise DataError("could not find two principal directions")
    for i in range(2):
        if basis[i, np.argmax(np.abs(basis[i]))] < 0:
            basis[i] = -basis[i]
    var = s**2
    explained = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    return Plane(center, basis, np.pad(explained, (0, 2 - len(explained))))


def check_resolution(resolution: int) -> int:
    """The grid size, refused before any work when it is not worth computing."""
    return check_count(
        resolution, "--resolution", 2, MAX_RESOLUTION,
        "grid points per axis; the landscape evaluates the model at its square",
    )  # fmt: skip


def grid_axes(coords: np.ndarray, resolution: int, margin: float = 0.3) -> tuple[np.ndarray, ...]:
    """Square grid (same step on both axes) covering every point with a margin on each side."""
    check_resolution(resolution)
    coords = np.atleast_2d(coords)
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    mid = (lo + hi) / 2
    half = max(float((hi - lo).max()) / 2, 1e-6) * (1 + 2 * margin)
    return tuple(np.linspace(m - half, m + half, resolution) for m in mid)


def parameter_keys(model: nn.Module) -> list[str]:
    """The state-dict keys that enter a parameter vector (trainable parameters only)."""
    return [name for name, _ in model.named_parameters()]


def parameter_vector(state: Mapping[str, Tensor], keys: Sequence[str]) -> np.ndarray:
    """Concatenate the named tensors of ``state`` into one float64 vector."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"the state dict lacks parameters {missing[:3]}; every model of a landscape must "
            "be of the sources' architecture"
        )
    return np.concatenate([state[k].detach().double().cpu().reshape(-1).numpy() for k in keys])


def state_from_vector(
    vector: np.ndarray, keys: Sequence[str], template: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Inverse of :func:`parameter_vector`; tensors not in ``keys`` come from ``template``."""
    state = dict(template)
    offset = 0
    for k in keys:
        t = template[k]
        n = t.numel()
        chunk = torch.from_numpy(np.ascontiguousarray(vector[offset : offset + n]))
        state[k] = chunk.reshape(t.shape).to(dtype=t.dtype, device=t.device)
        offset += n
    if offset != len(vector):
        raise SpecError(f"parameter vector has {len(vector)} entries, the model needs {offset}")
    return state


# -- the computation ----------------------------------------------------------------------


@dataclass
class Landscape:
    """Everything the figure shows; ``loss`` is (T + 1, R_v, R_u): tasks, then their mean."""

    methods: list[str]
    frame: str
    tasks: list[list[int]]
    us: np.ndarray
    vs: np.ndarray
    loss: np.ndarray
    point_methods: list[str]
    point_roles: list[str]
    points: np.ndarray
    point_loss: np.ndarray
    point_residual: np.ndarray
    paths: np.ndarray
    plane: Plane
    parameter_keys: list[str]
    renorm: str
    alphas: dict[str, float | None] = field(default_factory=dict)
    merges: dict[str, MergeResult] = field(default_factory=dict, repr=False)
    # Each method's merged weights (before renormalisation) in the frame basis; not saved.
    merged_states: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    @property
    def panel_names(self) -> list[str]:
        return [f"task {i}" for i in range(len(self.tasks))] + ["mean"]

    def point_index(self, method: str, role: str) -> int:
        for i, (m, r) in enumerate(zip(self.point_methods, self.point_roles, strict=True)):
            if m == method and r == role:
                return i
        raise ConfigError(f"no point {role!r} of method {method!r}")

    def arrays(self) -> dict[str, Any]:
        """The .npz content: grid, losses, projected points, paths and the PCA basis."""
        meta = {
            "methods": self.methods, "frame": self.frame, "tasks": self.tasks,
            "renorm": self.renorm, "alphas": self.alphas,
            "loss_axes": "panel (task 0..T-1, mean), v (PC2 index), u (PC1 index)",
        }  # fmt: skip
        return {
            "u": self.us,
            "v": self.vs,
            "loss": self.loss,
            "panels": np.array(self.panel_names),
            "points": self.points,
            "point_methods": np.array(self.point_methods),
            "point_roles": np.array(self.point_roles),
            "point_loss": self.point_loss,
            "point_residual": self.point_residual,
            "paths": self.paths,
            "path_methods": np.array(self.methods),
            "center": self.plane.center.astype(np.float32),
            "basis": self.plane.basis.astype(np.float32),
            "explained_variance_ratio": self.plane.explained,
            "parameter_keys": np.array(self.parameter_keys),
            "meta": json.dumps(meta),
        }


def load_landscape(path: str | Path) -> Landscape:
    """Re-read a landscape .npz written by the CLI, to redraw it without recomputing."""
    regular_file(path, "landscape data file")
    not_ours = f"{path} is not a landscape data file written by mudsc"
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:  # numpy's text suggests unpickling: not repeated
        raise DataError(f"{not_ours} (not a NumPy .npz archive)") from exc
    try:
        meta = json.loads(str(z["meta"]))
        plane = Plane(
            z["center"].astype(np.float64),
            z["basis"].astype(np.float64),
            z["explained_variance_ratio"],
        )
        return Landscape(
            methods=list(meta["methods"]),
            frame=meta["frame"],
            tasks=meta["tasks"],
            us=z["u"],
            vs=z["v"],
            loss=z["loss"],
            point_methods=[str(x) for x in z["point_methods"]],
            point_roles=[str(x) for x in z["point_roles"]],
            points=z["points"],
            point_loss=z["point_loss"],
            point_residual=z["point_residual"],
            paths=z["paths"],
            plane=plane,
            parameter_keys=[str(x) for x in z["parameter_keys"]],
            renorm=meta["renorm"],
            alphas=meta.get("alphas", {}),
        )
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{not_ours} ({exc})") from exc


def _to_frame(
    frame: MergeResult,
    other: MergeResult,
    spec: MergeSpec,
    example: Tensor,
    device: torch.device | str,
) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """Permutation that carries ``other``'s merged basis onto ``frame``'s (weight matching)."""
    matched = merge_models(
        [frame.model, other.model], None,
        MergeConfig(method="rebasin", repair="none", device=str(device)),
        spec=spec, example_input=example,
    )  # fmt: skip
    return lambda state: transform_state(spec, state, 1, matched.matches)


def _framed_points(
    results: Mapping[str, MergeResult],
    frame: str,
    sources: Sequence[nn.Module],
    spec: MergeSpec,
    example: Tensor,
    device: torch.device | str,
) -> dict[str, dict[str, dict[str, Tensor]]]:
    """Per method, the state dicts of its ROLES (sources and merge), in the frame's basis."""
    raw = [{k: v.detach() for k, v in m.state_dict().items()} for m in sources]
    framed: dict[str, dict[str, dict[str, Tensor]]] = {}
    for m, result in results.items():
        move = (
            (lambda s: dict(s))
            if m == frame
            else _to_frame(results[frame], result, spec, example, device)
        )
        ends = source_states(result, sources)
        merged = apply_matches(spec, raw, result.matches)
        framed[m] = {
            "source A": move(ends[0]), "source B": move(ends[1]), "merged": move(merged),
        }  # fmt: skip
    return framed


def compute_landscape(
    model_a: nn.Module,
    model_b: nn.Module,
    data: EvalSet,
    batches: Sequence[Tensor],
    methods: Sequence[str],
    resolution: int = 9,
    device: torch.device | str = "cpu",
    alpha: float | str = 0.5,
    path_steps: int = 5,
    margin: float = 0.3,
    merge_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> Landscape:
    """Merge with every method, frame all points, fit the plane, evaluate the grid."""
    methods = check_methods(methods)
    check_resolution(resolution)
    check_count(path_steps, "path_steps", 2, MAX_STEPS, "points on each interpolation path")
    if not batches:
        raise DataError("the landscape needs calibration batches (matching and BN reset)")
    sources = [model_a.to(device), model_b.to(device)]
    options = dict(merge_options or {})
    with eval_mode(*sources):
        results, spec = merge_every_method(
            sources, batches, methods, alpha, device, options, progress
        )
        frame = methods[0]
        keys = parameter_keys(sources[0])

        framed = _framed_points(results, frame, sources, spec, batches[0][:2], device)

        point_methods = [m for m in methods for _ in ROLES]
        point_roles = [r for _ in methods for r in ROLES]
        vectors = np.stack(
            [
                parameter_vector(framed[m][r], keys)
                for m, r in zip(point_methods, point_roles, strict=True)
            ]
        )
        ts = np.linspace(0.0, 1.0, path_steps)
        a, b = (ROLES.index(r) for r in ("source A", "source B"))
        path_vectors = np.stack(
            [
                (1 - t) * vectors[len(ROLES) * i + a] + t * vectors[len(ROLES) * i + b]
                for i in range(len(methods))
                for t in ts
            ]
        )
        plane = pca_plane(np.concatenate([vectors, path_vectors]))
        points = plane.project(vectors)
        paths = plane.project(path_vectors).reshape(len(methods), path_steps, 2)

        template = framed[frame]["merged"]
        renorm: Renormaliser = renormaliser_for(results[frame], sources, batches, device)

        def loss_at(vector: np.ndarray) -> np.ndarray:
            model = model_with_state(sources[0], state_from_vector(vector, keys, template))
            renorm(model)
            losses, _ = task_metrics(model, data, device)
            return np.append(losses, losses.mean())

        us, vs = grid_axes(np.concatenate([points, paths.reshape(-1, 2)]), resolution, margin)
        grid = (plane.point(u, v) for v in vs for u in us)
        total = resolution * resolution + len(vectors)
        losses = np.stack(
            [loss_at(x) for x in counted(itertools.chain(grid, vectors), "grid", total, progress)]
        )
        grid_loss = losses[: resolution * resolution].reshape(resolution, resolution, -1)
        loss = np.ascontiguousarray(grid_loss.transpose(2, 0, 1))
        point_loss = losses[resolution * resolution :]
        return Landscape(
            methods=methods,
            frame=frame,
            tasks=[list(t) for t in data.tasks],
            us=us,
            vs=vs,
            loss=loss,
            point_methods=point_methods,
            point_roles=point_roles,
            points=points,
            point_loss=point_loss,
            point_residual=plane.residual(vectors),
            paths=paths,
            plane=plane,
            parameter_keys=keys,
            renorm=renorm.label,
            alphas={m: r.alpha for m, r in results.items()},
            merges=results,
            merged_states={m: framed[m]["merged"] for m in methods},
        )


# -- the figure ---------------------------------------------------------------------------


def _levels(loss: np.ndarray, n: int = 16) -> tuple[np.ndarray, LogNorm]:
    finite = loss[np.isfinite(loss) & (loss > 0)]
    lo = float(finite.min()) if finite.size else 1e-3
    hi = float(finite.max()) if finite.size else 1.0
    hi = max(hi, lo * 1.01)
    return np.geomspace(lo, hi, n), LogNorm(lo, hi)


def nice_log_ticks(lo: float, hi: float) -> np.ndarray:
    """1-2-5 ticks within [lo, hi] (both ends added when fewer than three fall inside)."""
    decades = np.arange(np.floor(np.log10(lo)), np.ceil(np.log10(hi)) + 1)
    ticks = np.array([m * 10.0**d for d in decades for m in (1, 2, 5)])
    ticks = ticks[(ticks >= lo) & (ticks <= hi)]
    if len(ticks) < 3:
        ticks = np.unique(np.concatenate([[lo, hi], ticks]))
    return ticks


def _legend(fig: Figure, land: Landscape) -> None:
    """Row 1: methods (with the merged model's mean loss); row 2: what each marker is."""
    mean_col = land.loss.shape[0] - 1
    methods = [
        Line2D([], [], color=method_color(m), linestyle="--", linewidth=2,
               label=f"{m} (merged: mean loss "
               f"{land.point_loss[land.point_index(m, 'merged'), mean_col]:.2f})")
        for m in land.methods
    ]  # fmt: skip
    roles = [
        Line2D([], [], color="white", marker=POINT_MARKERS[r], markeredgecolor="black",
               markerfacecolor="lightgrey", markersize=12 if r == "merged" else 8,
               linestyle="none",
               label="merged model" if r == "merged" else f"{r} in the method's basis")
        for r in ROLES
    ]  # fmt: skip
    # Legends fill column by column: interleave so that methods and roles form two rows.
    cols = max(len(methods), len(roles))
    blank = Line2D([], [], linestyle="none", label=" ")
    methods += [blank] * (cols - len(methods))
    roles += [blank] * (cols - len(roles))
    handles = [h for pair in zip(methods, roles, strict=True) for h in pair]
    fig.legend(handles=handles, loc="outside lower center", ncols=cols, frameon=False)


def plot_landscape(land: Landscape) -> Figure:
    """One contour panel per task plus one for the mean; merges starred, paths dashed."""
    panels = land.loss.shape[0]
    fig = new_figure(4.2 * panels + 1.2, 5.6)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    levels, norm = _levels(land.loss)
    titles = [
        f"Task {i} loss (classes {', '.join(map(str, t))})" for i, t in enumerate(land.tasks)
    ] + ["Mean loss over tasks"]
    ev = land.plane.explained
    filled = None
    for p, ax in enumerate(axes):
        z = np.clip(land.loss[p], levels[0], levels[-1])
        filled = ax.contourf(land.us, land.vs, z, levels=levels, norm=norm, cmap="viridis")
        ax.contour(land.us, land.vs, z, levels=levels[::3], colors="white", linewidths=0.4,
                   alpha=0.6)  # fmt: skip
        for i, m in enumerate(land.methods):
            ax.plot(land.paths[i, :, 0], land.paths[i, :, 1], linestyle="--", linewidth=1.4,
                    color=method_color(m))  # fmt: skip
        for role in ROLES:
            idx = [i for i, r in enumerate(land.point_roles) if r == role]
            ax.scatter(
                land.points[idx, 0], land.points[idx, 1],
                c=[method_color(land.point_methods[i]) for i in idx],
                marker=POINT_MARKERS[role], s=260 if role == "merged" else 70,
                edgecolors="black", linewidths=0.9, zorder=5, label=role,
            )  # fmt: skip
        ax.set_title(titles[p])
        ax.set_xlabel(f"PC1 (parameter-space distance; {100 * ev[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC2 (parameter-space distance; {100 * ev[1]:.0f}% of variance)")
        ax.set_aspect("equal")
    cbar = fig.colorbar(filled, ax=list(axes), shrink=0.9, pad=0.02)
    cbar.set_ticks(nice_log_ticks(levels[0], levels[-1]))
    cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))
    cbar.ax.yaxis.set_minor_formatter(NullFormatter())
    cbar.set_label("cross-entropy loss (nats, log colour scale)")
    _legend(fig, land)
    fig.suptitle(
        f"Loss landscape on the PCA plane of sources, merges and paths (frame: {land.frame} "
        f"basis; {land.renorm} at every point)\nthe plane holds {100 * ev.sum():.0f}% of the "
        "points' variance; contours are the losses of points on the plane"
    )
    return fig


def landscape_rows(land: Landscape) -> list[list[str]]:
    """Table rows per marked point: method, role, per-task and mean loss, off-plane distance."""
    return [
        [m, r, *[f"{x:.3f}" for x in land.point_loss[i]], f"{land.point_residual[i]:.3g}"]
        for i, (m, r) in enumerate(zip(land.point_methods, land.point_roles, strict=True))
    ]
