"""Do the weight space and the activation space agree? (docs/ALGORITHM.md section 3.3).

MuDSC's premise is that units alike in only one space are not really alike.  Per merge
space this module measures:

* **agreement**: Spearman rank correlation between the cross-model block S[A, B] of the
  weight similarity S_w and of the activation similarity S_act, over all n x n unit pairs.
  S_w depends on the basis the *neighbouring* spaces are expressed in; it is computed with
  the matches of one *basis method* (the first listed), the basis that method's solver
  compared weights in.  Weight similarity is always the Pearson correlation here (also
  for ``rebasin``, which matches on raw inner products), so that both spaces share a scale.
* **matched similarity** per method: the mean similarity, in each space, of the unit
  pairs the method put into one merged unit (every pair of members of every merged unit,
  so zip's within-model merges count too; how many pairs are cross-model and how many
  within-model is reported with it).  S_w is taken in that method's own basis.

Spaces without an activation tap have no S_act; their entries are ``None``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy.stats import spearmanr
from torch import Tensor, nn

from mudsc.errors import DataError, SpecError
from mudsc.modes import eval_mode
from mudsc.plots.interpolate import check_methods, merge_every_method
from mudsc.plots.style import method_color, new_figure
from mudsc.progress import Progress
from mudsc.similarity import activation_similarity, weight_similarity
from mudsc.stats import collect_moments

log = logging.getLogger(__name__)
MAX_SCATTER = 4


# -- pure parts -----------------------------------------------------------------------------


def cluster_pairs(unmerge: Tensor | np.ndarray) -> np.ndarray:
    """(P, 2) stacked-unit index pairs (u < v) that share a merged unit (a column of U)."""
    u = np.asarray(unmerge.detach().cpu() if isinstance(unmerge, Tensor) else unmerge)
    pairs = []
    for k in range(u.shape[1]):
        members = np.flatnonzero(u[:, k] > 0.5)
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                pairs.append((members[a], members[b]))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def mean_over_pairs(similarity: Tensor | np.ndarray, pairs: np.ndarray) -> float | None:
    """Mean of S over the given pairs; None when there are none."""
    if len(pairs) == 0:
        return None
    s = np.asarray(similarity.detach().cpu() if isinstance(similarity, Tensor) else similarity)
    return float(s[pairs[:, 0], pairs[:, 1]].mean())


def cross_block(similarity: Tensor | np.ndarray, n: int) -> np.ndarray:
    """S[model 0 units, model 1 units] (n x n) of a 2n x 2n matrix."""
    s = np.asarray(similarity.detach().cpu() if isinstance(similarity, Tensor) else similarity)
    if s.shape != (2 * n, 2 * n):
        raise SpecError(f"expected a {2 * n} x {2 * n} similarity matrix, got {s.shape}")
    return s[:n, n:]


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation of two equally shaped arrays; None if either is constant."""
    a, b = np.ravel(a), np.ravel(b)
    if a.shape != b.shape:
        raise SpecError(f"cannot correlate arrays of {a.size} and {b.size} entries")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    rho = spearmanr(a, b).statistic
    return None if not np.isfinite(rho) else float(rho)


# -- the computation ----------------------------------------------------------------------


@dataclass
class SpaceDiagnosis:
    """One merge space: its size, the rank agreement and each method's matched similarity."""

    name: str
    size: int
    spearman: float | None
    matched: dict[str, dict[str, float | int | None]]

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.name, "size": self.size, "spearman": self.spearman,
                "matched": self.matched}  # fmt: skip


@dataclass
class Diagnosis:
    """Per-space results plus the cross blocks (S_w in the basis method) for scatter plots."""

    methods: list[str]
    basis: str
    spaces: list[SpaceDiagnosis]
    cross: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    cross_pairs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "methods": self.methods,
            "basis_method": self.basis,
            "weight_similarity": "correlation",
            "spaces": [s.to_dict() for s in self.spaces],
        }


def compute_diagnosis(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Sequence[Tensor],
    methods: Sequence[str],
    device: torch.device | str = "cpu",
    alpha: float | str = 0.5,
    merge_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> Diagnosis:
    """Merge with every method, then compare S_w and S_act space by space."""
    methods = check_methods(methods)
    if not batches:
        raise DataError("the diagnosis needs calibration batches (activation similarity)")
    sources = [model_a.to(device), model_b.to(device)]
    options = dict(merge_options or {})
    with eval_mode(*sources):
        results, spec = merge_every_method(
            sources, batches, methods, alpha, device, options, progress
        )
        tapped = [s.name for s in spec.mergeable if s.taps]
        moments = collect_moments(sources, spec, batches, device, spaces=tapped)
        s_act = {name: activation_similarity(mo) for name, mo in moments.items()}
        states = [{k: v.detach() for k, v in m.state_dict().items()} for m in sources]
        basis = methods[0]

        out = Diagnosis(methods=methods, basis=basis, spaces=[])
        for space in spec.mergeable:
            n = space.size
            act = s_act.get(space.name)
            s_w = {
                m: weight_similarity(spec, space.name, states, results[m].matches, "correlation")
                for m in methods
            }
            matched: dict[str, dict[str, float | int | None]] = {}
            out.cross_pairs[space.name] = {}
            for m in methods:
                pairs = cluster_pairs(results[m].matches[space.name].unmerge)
                cross = pairs[(pairs[:, 0] < n) & (pairs[:, 1] >= n)]
                matched[m] = {
                    "activation": None if act is None else mean_over_pairs(act, pairs),
                    "weight": mean_over_pairs(s_w[m], pairs),
                    "cross_model_pairs": len(cross),
                    "within_model_pairs": len(pairs) - len(cross),
                }
                out.cross_pairs[space.name][m] = np.stack([cross[:, 0], cross[:, 1] - n], axis=1)
            rho = None
            w_cross = cross_block(s_w[basis], n)
            if act is not None:
                a_cross = cross_block(act, n)
                rho = rank_agreement(w_cross, a_cross)
                out.cross[space.name] = (w_cross, a_cross)
            out.spaces.append(SpaceDiagnosis(space.name, n, rho, matched))
        return out


# -- the figure ---------------------------------------------------------------------------


def _scatter_spaces(diag: Diagnosis) -> list[str]:
    """Up to MAX_SCATTER spaces with activations, spread from first to last."""
    names = [s.name for s in diag.spaces if s.name in diag.cross]
    if len(names) <= MAX_SCATTER:
        return names
    idx = np.unique(np.linspace(0, len(names) - 1, MAX_SCATTER).round().astype(int))
    return [names[i] for i in idx]


def _bars(ax: Any, diag: Diagnosis, key: str, names: list[str]) -> None:
    x = np.arange(len(names))
    width = 0.8 / len(diag.methods)
    for j, m in enumerate(diag.methods):
        vals = [diag_space.matched[m][key] for diag_space in diag.spaces]
        heights = [np.nan if v is None else v for v in vals]
        ax.bar(x + (j - (len(diag.methods) - 1) / 2) * width, heights, width,
               color=method_color(m), label=m)  # fmt: skip
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(True, axis="y", alpha=0.3)


def plot_diagnosis(diag: Diagnosis) -> Figure:
    """Top: S_w vs S_act scatters; middle: rank agreement per space; bottom: matched means."""
    scatter = _scatter_spaces(diag)
    cols = max(len(scatter), 2)
    fig = new_figure(3.6 * cols + 1.0, 12.0)
    grid = fig.add_gridspec(3, cols * 2, height_ratios=[1.1, 0.8, 0.9])
    info = {s.name: s for s in diag.spaces}
    for c, name in enumerate(scatter):
        ax = fig.add_subplot(grid[0, 2 * c : 2 * c + 2])
        w, a = diag.cross[name]
        ax.scatter(a.ravel(), w.ravel(), s=4, color="#b8b8b8", linewidths=0,
                   label="all cross-model unit pairs")  # fmt: skip
        for m in diag.methods:
            p = diag.cross_pairs[name][m]
            if len(p):
                ax.scatter(a[p[:, 0], p[:, 1]], w[p[:, 0], p[:, 1]], s=16,
                           color=method_color(m), edgecolors="black", linewidths=0.3,
                           label=f"merged by {m} ({len(p)} cross-model)")  # fmt: skip
        rho = info[name].spearman
        rho_text = "n/a" if rho is None else f"{rho:.2f}"
        ax.set_title(f"{name} (n = {info[name].size})\nSpearman rho = {rho_text}", fontsize=10)
        ax.set_xlabel("activation similarity S_act (Pearson r)")
        ax.set_ylabel(f"weight similarity S_w (r, {diag.basis} basis)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best", markerscale=1.5)
    names = [s.name for s in diag.spaces]
    x = np.arange(len(names))
    ax = fig.add_subplot(grid[1, :])
    rhos = [np.nan if s.spearman is None else s.spearman for s in diag.spaces]
    ax.bar(x, rhos, color="#4d4d4d")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("Spearman rho (S_w vs S_act)")
    ax.set_xlabel("merge space (network order)")
    ax.set_title(
        f"Agreement of weight and activation similarity over all cross-model pairs "
        f"(S_w in the {diag.basis} basis)"
    )
    ax.grid(True, axis="y", alpha=0.3)
    for col, (key, label) in enumerate(
        (("activation", "activation similarity"), ("weight", "weight similarity"))
    ):
        ax = fig.add_subplot(grid[2, col * cols : (col + 1) * cols])
        _bars(ax, diag, key, names)
        ax.set_title(f"Mean {label} of the unit pairs each method merged (any model)")
        ax.set_ylabel(f"mean matched {label} (r)")
        ax.set_xlabel("merge space (network order)")
    handles = [Patch(color=method_color(m), label=m) for m in diag.methods]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False,
               title="method (bars)")  # fmt: skip
    fig.suptitle("Do weight space and activation space agree on which units are alike?")
    return fig


def diagnosis_rows(diag: Diagnosis) -> list[list[str]]:
    """Table rows: space, n, rho, then matched act / weight similarity per method."""

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    return [
        [s.name, str(s.size), fmt(s.spearman)]
        + [fmt(s.matched[m][k]) for m in diag.methods for k in ("activation", "weight")]
        for s in diag.spaces
    ]
