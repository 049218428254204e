"""One look for every figure: a colour per method, a style per curve, atomic file writes.

Every figure and data file carries mudsc's mark (:func:`mudsc.atomic.mark_png`,
:func:`~mudsc.atomic.mark_npz`; a JSON data file belongs to the marked figure beside it),
which is what lets ``--force`` replace them and nothing else.

Every figure of ``mudsc.plots`` draws a method in the same colour, so a reader who has
learned that MuDSC is red in the landscape finds it red in the diagnosis and the
interpolation plots too.  Figures are built on matplotlib's Agg backend (no display) with
the object-oriented API, so building one never touches global pyplot state.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402  (a matplotlib dependency)

from mudsc.atomic import (  # noqa: E402
    atomic_write_bytes,
    atomic_write_text,
    mark_npz,
    mark_png,
    refuse_existing,
)
from mudsc.errors import ConfigError  # noqa: E402

# Fixed per method (colour-blind-safe Tol "bright"/"muted" hues): never reassigned by order.
METHOD_COLORS: dict[str, str] = {
    "avg": "#777777",
    "rebasin": "#4477AA",
    "act-align": "#66CCEE",
    "zipit": "#228833",
    "wzip": "#CCBB44",
    "mudsc-align": "#AA3377",
    "mudsc-zip": "#EE6677",
}
FALLBACK_COLORS = ("#332288", "#117733", "#882255", "#44AA99", "#999933")

# Curves of an interpolation: how the two end points are put in one basis.
VARIANT_STYLES: dict[str, dict[str, Any]] = {
    "naive": {"linestyle": ":", "marker": "x", "use_method_color": False, "color": "#555555"},
    "aligned": {"linestyle": "--", "marker": "o", "use_method_color": True},
    "aligned + renorm": {"linestyle": "-", "marker": "s", "use_method_color": True},
}

# Marker shapes for the points of a landscape (colour says the method, shape the role).
POINT_MARKERS: dict[str, str] = {"source A": "o", "source B": "s", "merged": "*"}

DPI = 100


def method_color(method: str) -> str:
    """The method's fixed colour; unknown names get a stable colour from their hash."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return FALLBACK_COLORS[sum(map(ord, method)) % len(FALLBACK_COLORS)]


def variant_style(variant: str, method: str) -> dict[str, Any]:
    """Line style of one interpolation curve (colour from the method where it applies)."""
    if variant not in VARIANT_STYLES:
        raise ConfigError(
            f"unknown interpolation variant {variant!r}; known: {list(VARIANT_STYLES)}"
        )
    style = dict(VARIANT_STYLES[variant])
    if style.pop("use_method_color"):
        style["color"] = method_color(method)
    return style


def new_figure(width: float, height: float) -> Figure:
    """A figure detached from pyplot (no global state, garbage-collected with its owner)."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def refuse_existing_outputs(paths: Iterable[Path], force: bool) -> None:
    """Fail before any work if an output exists and ``force`` was not given."""
    for path in paths:
        refuse_existing(path, force)


def save_figure(fig: Figure, path: str | Path, palette: bool = True, force: bool = True) -> Path:
    """Render ``fig`` as PNG into ``path`` through a temporary sibling and a rename.

    ``force`` replaces a figure mudsc wrote; without it any existing file is refused.
    With ``palette`` the image is reduced to 256 colours (no dithering): these figures are
    flat fills, lines and text, so the file shrinks about threefold without visible change.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"figures are written as PNG; name the output *.png, not {path.name!r}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    if palette:
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        image = image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    atomic_write_bytes(path, mark_png(buffer.getvalue()), force)
    return path


def save_npz(path: str | Path, arrays: Mapping[str, Any], force: bool = True) -> Path:
    """Write arrays as a compressed .npz atomically (strings stored as unicode arrays)."""
    path = Path(path)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, mark_npz(buffer.getvalue()), force)
    return path


def save_json(path: str | Path, data: Any, force: bool = True) -> Path:
    """Write JSON atomically; NaN is not JSON, so callers pass None for missing values."""
    path = Path(path)
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n", force)
    return path


def data_path(png: str | Path, suffix: str) -> Path:
    """The data file written next to a figure: ``landscape.png`` -> ``landscape.npz``."""
    png = Path(png)
    if png.suffix.lower() != ".png":
        raise ConfigError(f"figures are written as PNG; name the output *.png, not {png.name!r}")
    return png.with_suffix(suffix)
