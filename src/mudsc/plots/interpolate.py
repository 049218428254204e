"""Loss and accuracy along the straight path between two source models.

Three curves answer "is there a barrier, and does alignment remove it?":

* ``naive``: interpolate the raw state dicts (no alignment, running statistics interpolated
  too), the picture of why averaging unaligned networks fails;
* ``aligned``: interpolate both models after re-expressing each in the merged basis of one
  method (``mudsc.apply.transform_state``); the midpoint is that method's merged model
  before normalisation repair.  For permutation methods the end points are the source
  models exactly (permuted); for zip methods they are the *lossy* projections of each
  source onto the merged units, so the end points may already score below the sources;
* ``aligned + renorm``: the same points after re-estimating BatchNorm statistics (or REPAIR
  for networks without BatchNorm, with targets interpolated like the weights).

This module also holds the evaluation primitives the landscape reuses: a labelled evaluation
set, per-task loss/accuracy, and the renormalisation step.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from torch import Tensor, nn

from mudsc.apply import transform_state
from mudsc.data import ImageDataset
from mudsc.errors import CheckpointError, ConfigError, DataError
from mudsc.evaluate import embed
from mudsc.figure_limits import MAX_STEPS
from mudsc.merge import MergeConfig, MergeResult, merge_models
from mudsc.methods import METHODS
from mudsc.models.head import ClassEmbeddingHead
from mudsc.modes import eval_mode
from mudsc.plots.style import new_figure, variant_style
from mudsc.progress import Progress, counted, tracked
from mudsc.renorm import apply_repair, reset_batchnorm, resolve_mode
from mudsc.solvers.match import Match
from mudsc.spaces import MergeSpec

log = logging.getLogger(__name__)

LOSS_SCALE = 100.0  # cosine-logit scale used in training (docs/ALGORITHM.md section 8)
VARIANTS = ("naive", "aligned", "aligned + renorm")
RENORM_LABELS = {"bn": "BN reset", "repair": "REPAIR", "none": "no renormalisation"}


# -- evaluation primitives (shared with the landscape) --------------------------------


@dataclass(frozen=True)
class EvalSet:
    """Normalised labelled images and the tasks (class lists) each loss is computed over."""

    images: Tensor
    labels: Tensor
    tasks: tuple[tuple[int, ...], ...]
    head: ClassEmbeddingHead

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} evaluation images but {len(self.labels)} labels")
        if not self.tasks or any(not t for t in self.tasks):
            raise ConfigError("evaluation needs at least one non-empty task (a list of class ids)")
        flat = [c for t in self.tasks for c in t]
        if len(set(flat)) != len(flat):
            raise ConfigError(f"tasks overlap: {self.tasks}; each class may belong to one task")
        for i, task in enumerate(self.tasks):
            if not torch.isin(self.labels, torch.tensor(task)).any():
                raise DataError(
                    f"the evaluation images contain no image of task {i} (classes {list(task)}); "
                    "use a larger --data-size"
                )

    @classmethod
    def sample(
        cls,
        dataset: ImageDataset,
        tasks: Sequence[Sequence[int]],
        head: ClassEmbeddingHead,
        size: int,
        seed: int = 0,
    ) -> EvalSet:
        """``size`` test images of the tasks' classes, drawn with ``seed``."""
        union = sorted({int(c) for t in tasks for c in t})
        images, labels = dataset.subset(union, split="test")
        if not 0 < size <= len(images):
            raise ConfigError(
                f"--data-size must be in 1..{len(images)} (test images of classes {union}), "
                f"got {size}"
            )
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:size]
        return cls(
            dataset.normalize(images[order]),
            labels[order],
            tuple(tuple(int(c) for c in t) for t in tasks),
            head,
        )


@torch.no_grad()
def task_metrics(
    model: nn.Module, data: EvalSet, device: torch.device | str, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Per-task cross-entropy (cosine logits x 100 over the task's classes) and accuracy."""
    emb = embed(model, data.images, batch_size, device)
    head = data.head.to("cpu")
    losses, accs = [], []
    for task in data.tasks:
        mask = torch.isin(data.labels, torch.tensor(task))
        logits = head(emb[mask], list(task), scale=LOSS_SCALE).double()
        lookup = {c: i for i, c in enumerate(task)}
        target = torch.tensor([lookup[int(c)] for c in data.labels[mask]])
        losses.append(F.cross_entropy(logits, target).item())
        accs.append((logits.argmax(1) == target).double().mean().item())
    return np.asarray(losses), np.asarray(accs)


def weighted_matches(matches: Mapping[str, Match], weights: Sequence[float]) -> dict[str, Match]:
    """Matches whose merge blocks average the sources with ``weights`` instead of equally.

    REPAIR's target for a merged unit is the M-weighted mean of the source units' statistics;
    scaling model i's merge block by N * w_i makes it the w-weighted mean, the right target
    for a point (1 - t) A + t B of an interpolation (t = 1/2 gives the merge itself back).
    """
    out = {}
    for name, m in matches.items():
        if len(weights) != m.n_models:
            raise ConfigError(f"{len(weights)} interpolation weights for {m.n_models} models")
        scale = torch.cat(
            [torch.full((m.size, 1), m.n_models * float(w), dtype=m.merge.dtype) for w in weights]
        ).to(m.merge.device)
        out[name] = Match(m.merge * scale, m.unmerge, m.value, m.n_models)
    return out


@dataclass
class Renormaliser:
    """Restores normalisation statistics of a model built from re-expressed weights.

    ``bn``: re-estimate BatchNorm statistics on ``batches``.  ``repair``: REPAIR against the
    ``sources`` through ``matches`` (the basis the model is expressed in).  ``none``: nothing.
    """

    mode: str
    batches: Sequence[Tensor]
    device: torch.device | str
    sources: Sequence[nn.Module] = ()
    spec: MergeSpec | None = None
    matches: Mapping[str, Match] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return RENORM_LABELS[self.mode]

    def __call__(self, model: nn.Module, weights: Sequence[float] | None = None) -> None:
        if self.mode == "bn":
            reset_batchnorm(model, self.batches, self.device)
        elif self.mode == "repair":
            if self.spec is None or not self.sources:
                raise ConfigError("REPAIR needs the source models, the spec and the matches")
            matches = self.matches if weights is None else weighted_matches(self.matches, weights)
            apply_repair(model, self.sources, self.spec, matches, list(self.batches), self.device)
        model.eval()


def renormaliser_for(
    result: MergeResult,
    sources: Sequence[nn.Module],
    batches: Sequence[Tensor],
    device: torch.device | str,
) -> Renormaliser:
    """The renormalisation the merge itself used (BN reset, REPAIR or none)."""
    mode = resolve_mode(result.config.repair, sources[0])
    return Renormaliser(mode, batches, device, sources, result.spec, result.matches)


def lerp_state(a: Mapping[str, Tensor], b: Mapping[str, Tensor], t: float) -> dict[str, Tensor]:
    """(1 - t) a + t b for floating tensors; integer tensors (BN counters) are taken from a."""
    if set(a) != set(b):
        raise CheckpointError(
            "cannot interpolate state dicts with different tensors; both models must be of "
            "one architecture"
        )
    return {
        k: torch.lerp(v.float(), b[k].float().to(v.device), t).to(v.dtype)
        if v.is_floating_point()
        else v.clone()
        for k, v in a.items()
    }


def model_with_state(template: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``template`` (same class) holding ``state``, in eval mode."""
    model = copy.deepcopy(template)
    model.load_state_dict(dict(state))
    return model.eval()


def source_states(result: MergeResult, sources: Sequence[nn.Module]) -> list[dict[str, Tensor]]:
    """Each source's state dict re-expressed in the merged basis of ``result``."""
    return [
        transform_state(
            result.spec, {k: v.detach() for k, v in m.state_dict().items()}, i, result.matches
        )
        for i, m in enumerate(sources)
    ]


def check_count(value: int, option: str, low: int, high: int, why: str) -> int:
    """An integer option in ``low..high`` (a figure's steps or grid size), or one line
    saying so: checked before any merge, so a bad value costs nothing."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not (low <= value <= high)
    ):
        raise ConfigError(f"{option} must be an integer in {low}..{high} ({why}), got {value!r}")
    return int(value)


def check_methods(methods: Sequence[str]) -> list[str]:
    """The methods as a list, or an error naming the unknown or repeated ones."""
    methods = list(methods)
    if not methods:
        raise ConfigError(f"name at least one method; valid methods: {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; valid methods: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods are listed twice: {methods}")
    return methods


def merge_every_method(
    sources: Sequence[nn.Module],
    batches: Sequence[Tensor],
    methods: Sequence[str],
    alpha: float | str,
    device: torch.device | str,
    options: Mapping[str, Any],
    progress: Progress | None,
) -> tuple[dict[str, MergeResult], MergeSpec]:
    """Merge the sources with every method, tracing once: the first merge's spec serves
    the others (a figure compares methods on one set of spaces)."""
    results: dict[str, MergeResult] = {}
    spec = None
    for m in tracked(methods, "merge", progress):
        cfg = MergeConfig(method=m, alpha=alpha, device=str(device), **options)
        results[m] = merge_models(sources, batches, cfg, spec=spec)
        spec = results[m].spec
    assert spec is not None
    return results, spec


# -- the interpolation itself ---------------------------------------------------------


@dataclass
class Interpolation:
    """Loss/accuracy per variant, step and task (arrays shaped (V, S, T))."""

    method: str
    ts: np.ndarray
    variants: tuple[str, ...]
    loss: np.ndarray
    accuracy: np.ndarray
    tasks: list[list[int]]
    renorm: str
    alpha: float | None = None

    def label(self, variant: str) -> str:
        """How a variant is called in the figure and the table."""
        if variant == "aligned + renorm":
            return f"aligned ({self.method}) + {self.renorm}"
        if variant == "aligned":
            return f"aligned ({self.method})"
        return "naive (no alignment)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "alpha": self.alpha,
            "renorm": self.renorm,
            "tasks": self.tasks,
            "t": self.ts.tolist(),
            "variants": {
                v: {
                    "label": self.label(v),
                    "loss": self.loss[i].tolist(),
                    "accuracy": self.accuracy[i].tolist(),
                    "mean_loss": self.loss[i].mean(axis=1).tolist(),
                    "mean_accuracy": self.accuracy[i].mean(axis=1).tolist(),
                }
                for i, v in enumerate(self.variants)
            },
        }


def load_interpolation(data: Mapping[str, Any]) -> Interpolation:
    """Rebuild an :class:`Interpolation` from its ``to_dict`` JSON, to redraw it."""
    try:
        variants = tuple(data["variants"])
        return Interpolation(
            method=data["method"],
            ts=np.asarray(data["t"], dtype=np.float64),
            variants=variants,
            loss=np.asarray([data["variants"][v]["loss"] for v in variants], dtype=np.float64),
            accuracy=np.asarray(
                [data["variants"][v]["accuracy"] for v in variants], dtype=np.float64
            ),
            tasks=[list(t) for t in data["tasks"]],
            renorm=data["renorm"],
            alpha=data.get("alpha"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"not an interpolation data file written by mudsc ({exc})") from exc


def compute_interpolation(
    model_a: nn.Module,
    model_b: nn.Module,
    data: EvalSet,
    batches: Sequence[Tensor],
    method: str = "mudsc-zip",
    steps: int = 11,
    device: torch.device | str = "cpu",
    alpha: float | str = 0.5,
    merge_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> Interpolation:
    """Evaluate every task along the naive and the aligned straight paths from A to B."""
    check_count(steps, "--steps", 2, MAX_STEPS, "the two end points and the points between")
    if not batches:
        raise DataError("interpolation needs calibration batches (for matching and BN reset)")
    sources = [model_a.to(device), model_b.to(device)]
    config = MergeConfig(method=method, alpha=alpha, device=str(device), **(merge_options or {}))
    ts = np.linspace(0.0, 1.0, steps)
    loss = np.zeros((len(VARIANTS), steps, len(data.tasks)))
    acc = np.zeros_like(loss)
    points = itertools.product(enumerate(ts), enumerate(VARIANTS))
    with eval_mode(*sources):
        result = merge_models(sources, batches, config)
        renorm = renormaliser_for(result, sources, batches, device)
        raw = [{k: v.detach() for k, v in m.state_dict().items()} for m in sources]
        aligned = source_states(result, sources)
        for (s, t), (v, variant) in counted(points, "interpolate", steps * len(VARIANTS), progress):
            ends = raw if variant == "naive" else aligned
            model = model_with_state(sources[0], lerp_state(ends[0], ends[1], float(t)))
            if variant == "aligned + renorm":
                renorm(model, (1.0 - float(t), float(t)))
            loss[v, s], acc[v, s] = task_metrics(model, data, device)
    return Interpolation(
        method=method,
        ts=ts,
        variants=VARIANTS,
        loss=loss,
        accuracy=acc,
        tasks=[list(t) for t in data.tasks],
        renorm=renorm.label,
        alpha=result.alpha,
    )


def _classes(task: Sequence[int]) -> str:
    return ", ".join(str(c) for c in task)


def _minor_label(x: float, _pos: int) -> str:
    """Label only the 2x and 5x minor ticks of a log axis (the others would collide)."""
    mantissa = round(x / 10 ** math.floor(math.log10(x)), 6) if x > 0 else 0
    return f"{x:.2g}" if mantissa in (2, 5) else ""


def plot_interpolation(interp: Interpolation) -> Figure:
    """Loss (top row, log scale) and accuracy (bottom row) per task and their mean."""
    n_tasks = len(interp.tasks)
    cols = n_tasks + 1
    fig = new_figure(4.0 * cols, 6.6)
    axes = fig.subplots(2, cols, sharex=True, squeeze=False)
    titles = [f"Task {i} (classes {_classes(t)})" for i, t in enumerate(interp.tasks)]
    titles.append("Mean over tasks")
    for c in range(cols):
        rows = ((interp.loss, "cross-entropy loss (nats, log scale)"),
                (interp.accuracy, "accuracy (%)"))  # fmt: skip
        for r, (values, ylabel) in enumerate(rows):
            ax = axes[r, c]
            for v, variant in enumerate(interp.variants):
                y = values[v, :, c] if c < n_tasks else values[v].mean(axis=1)
                if r == 1:
                    y = 100.0 * y
                ax.plot(
                    interp.ts, y, label=interp.label(variant), markersize=4,
                    **variant_style(variant, interp.method),
                )  # fmt: skip
            if r == 0:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.3g}"))
                ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
                ax.tick_params(axis="y", which="minor", labelsize=7)
                ax.set_title(titles[c])
            else:
                ax.set_ylim(-2, 102)
                ax.set_xlabel("t (0 = model A, 1 = model B)")
            ax.set_ylabel(ylabel)
            ax.axvline(0.5, color="#bbbbbb", linewidth=0.8, zorder=0)
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    alpha = "" if interp.alpha is None else f", alpha {interp.alpha:g}"
    fig.suptitle(
        f"Straight path from model A to model B, aligned with {interp.method}{alpha} "
        "(grey line: t = 0.5, the merge)"
    )
    return fig


def interpolation_rows(interp: Interpolation) -> list[list[str]]:
    """Table rows: t, then mean loss and mean accuracy (%) of each variant."""
    rows = []
    for s, t in enumerate(interp.ts):
        row = [f"{t:.2f}"]
        for v in range(len(interp.variants)):
            row += [f"{interp.loss[v, s].mean():.3f}", f"{100 * interp.accuracy[v, s].mean():.1f}"]
        rows.append(row)
    return rows
