"""Pictures for researchers: loss landscapes, space-agreement diagnostics, interpolations.

Each module computes plain data (a dataclass of numpy arrays, saved as .npz/.json) and
draws it in a separate function, so figures can be tested on their own; landscapes and
interpolations can be re-read from their data files and redrawn without recomputing.
"""

from mudsc.plots.diagnose import Diagnosis, compute_diagnosis, plot_diagnosis
from mudsc.plots.interpolate import (
    EvalSet,
    Interpolation,
    compute_interpolation,
    load_interpolation,
    plot_interpolation,
)
from mudsc.plots.landscape import Landscape, compute_landscape, load_landscape, plot_landscape
from mudsc.plots.style import METHOD_COLORS, method_color

__all__ = [
    "METHOD_COLORS",
    "Diagnosis",
    "EvalSet",
    "Interpolation",
    "Landscape",
    "compute_diagnosis",
    "compute_interpolation",
    "compute_landscape",
    "load_interpolation",
    "load_landscape",
    "method_color",
    "plot_diagnosis",
    "plot_interpolation",
    "plot_landscape",
]
