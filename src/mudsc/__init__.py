"""mudsc: merge separately trained networks without training (MuDSC and its baselines).

The public API is imported lazily so that ``import mudsc`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "trace": "mudsc.spaces",
    "trace_model": "mudsc.spaces",
    "TracedModel": "mudsc.spaces",
    "MergeSpec": "mudsc.spaces",
    "merge": "mudsc.merge",
    "merge_models": "mudsc.merge",
    "MergeConfig": "mudsc.merge",
    "MergeResult": "mudsc.merge",
    "METHODS": "mudsc.methods",
    "Method": "mudsc.methods",
    "evaluate": "mudsc.evaluate",
    "Report": "mudsc.evaluate",
    "train": "mudsc.train",
    "TrainConfig": "mudsc.train",
    "load_checkpoint": "mudsc.checkpoint",
    "save_checkpoint": "mudsc.checkpoint",
    "MudscError": "mudsc.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mudsc' has no attribute {name!r}")
