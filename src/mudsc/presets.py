"""Named presets: sets of ``MergeConfig`` values that one name (``--preset``) selects.

``mudsc`` is the library's own defaults (no values: whatever ``MergeConfig``'s defaults are
today), ``paper`` the settings of the MuDSC authors' code, so that reproducing the paper is
one flag even where mudsc's defaults differ.  A preset lists every value it depends on,
each with why, so it keeps its meaning when the defaults change.  Values given explicitly
(keywords, command-line options, experiment keys) win over the preset's
(``MergeConfig.from_preset``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mudsc.registry import Registry


@dataclass(frozen=True)
class Setting:
    """One ``MergeConfig`` field's value in a preset, and why it has it."""

    field: str
    value: Any
    why: str


@dataclass(frozen=True)
class Preset:
    """A named set of ``MergeConfig`` values."""

    name: str
    summary: str
    settings: tuple[Setting, ...] = ()

    def values(self) -> dict[str, Any]:
        """Field -> value, as ``MergeConfig`` keywords."""
        return {s.field: s.value for s in self.settings}

    @property
    def description(self) -> str:
        """The summary, then one line per setting with its reason."""
        lines = [f"{self.name}: {self.summary}"]
        lines += [f"    {s.field}={s.value!r}: {s.why}" for s in self.settings]
        return "\n".join(lines)


PAPER = Preset(
    "paper",
    "the MuDSC authors' settings, from Xu et al. (CVPR 2024) and their public code",
    (
        Setting("taps", "last", "a residual stream is read once per stage, where it is read "
                "last: the input of the next stage's shortcut convolution, or the head's "
                "input for the last stage (pooled features; the authors read the map "
                "before pooling)"),
        Setting("weight_similarity", "correlation", "Git Re-Basin on the correlation of "
                "weights (the authors' useperm), not on raw inner products"),
        Setting("sweep_rule", "restart", "after a sweep that does not improve, restart from "
                "the best matching so far"),
        Setting("tolerance", 0.0, "any increase of the sweep score counts as progress"),
        Setting("max_sweeps", 100, "at most 100 weight sweeps"),
        Setting("patience", 5, "stop after 5 sweeps without improvement"),
        Setting("alpha", 0.5, "the balance factor used where the paper does not sweep it"),
        Setting("alpha_grid", (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                "the paper's sweep of alpha"),
        Setting("zip_a", 0.5, "MuDSC's zip re-merge damping a"),
        Setting("zip_b", 1.0, "MuDSC's zip within-model budget b"),
        Setting("repair", "auto", "BatchNorm reset on BatchNorm models, as the authors; "
                "elsewhere auto means REPAIR, where the authors' code corrects nothing "
                "(repair='none' for that)"),
        Setting("stop_at", None, "a full merge, as the paper's tables"),
    ),
)  # fmt: skip

PRESETS: Registry[Preset] = Registry(
    "preset",
    "presets",
    [Preset("mudsc", "mudsc's own defaults (MergeConfig's)"), PAPER],
)


def presets_help() -> str:
    """``--preset``'s help: every preset with its values (the reasons are in
    ``Preset.description`` and docs/DECISIONS.md)."""
    parts = []
    for name in PRESETS:
        preset = PRESETS[name]
        values = ", ".join(f"{s.field}={s.value}" for s in preset.settings)
        parts.append(f"{name}: {preset.summary}" + (f" ({values})" if values else ""))
    return "named settings to start from; options given explicitly win. " + "; ".join(parts)
