"""mudsc: merge separately trained networks without training (MuDSC and its baselines).

The public API is imported lazily so that ``import mudsc`` stays cheap for the CLI.

Three public functions share their name with the module that defines them (``merge``,
``evaluate``, ``train``).  Importing such a module makes Python set it as the package
attribute, which would shadow the function (``mudsc.merge(...)`` would then fail with
"'module' object is not callable").  Those modules are therefore made callable when they
become package attributes: calling one calls its function, and everything else
(``import mudsc.train as m``, ``m.lr_at``, monkeypatching) still sees the module.
"""

from __future__ import annotations

import importlib
import sys
import types
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
    "estimate_merge": "mudsc.estimate",
    "plan_merge": "mudsc.estimate",
    "METHODS": "mudsc.methods",
    "Method": "mudsc.methods",
    "evaluate": "mudsc.evaluate",
    "Report": "mudsc.evaluate",
    "train": "mudsc.train",
    "TrainConfig": "mudsc.train",
    "load_checkpoint": "mudsc.checkpoint",
    "save_checkpoint": "mudsc.checkpoint",
    "MudscError": "mudsc.errors",
    "ConfigError": "mudsc.errors",
    "DataError": "mudsc.errors",
    "SpecError": "mudsc.errors",
    "ResourceError": "mudsc.errors",
    "CheckpointError": "mudsc.errors",
    "CorruptCheckpointError": "mudsc.errors",
}

# Submodules named like the public function they define.
_CALLABLE_MODULES = frozenset({"merge", "evaluate", "train"})

__all__ = ["__version__", *_EXPORTS]


class _CallableModule(types.ModuleType):
    """A submodule that, called, calls its namesake function (``mudsc.merge(...)``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    """The ``mudsc`` package: a namesake submodule becomes callable as it is attached."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CALLABLE_MODULES and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
            value.__wrapped__ = getattr(value, name)  # inspect.signature shows the function's
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mudsc' has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
