"""The model zoo's registry (name -> factory), plus the argument checks shared by the zoo.

Checkpoints store an architecture by name and keyword arguments, so every model must be
rebuildable from ``create(name, **config)``; keeping the lookup and the argument checks in
one place makes bad names and bad arguments fail with one clear message.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from mudsc.errors import MudscError
from mudsc.registry import Registry

F = TypeVar("F", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelEntry:
    """One zoo architecture: its name and the class (or function) that builds it."""

    name: str
    factory: Callable[..., nn.Module]


MODELS: Registry[ModelEntry] = Registry("architecture", "names")


def register(name: str) -> Callable[[F], F]:
    """Decorator registering a model class (or factory) under ``name`` for :func:`create`."""

    def decorator(factory: F) -> F:
        MODELS.register(ModelEntry(name, factory))
        return factory

    return decorator


def names() -> list[str]:
    """Sorted names of every registered architecture."""
    return sorted(MODELS.names())


def create(name: str, **kwargs: object) -> nn.Module:
    """Build the architecture registered as ``name`` with keyword arguments ``kwargs``."""
    factory = MODELS.get(name).factory
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params]
    if unknown and not accepts_any:
        valid = [k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        raise MudscError(
            f"architecture {name!r} has no argument {unknown[0]!r}; "
            f"valid arguments: {', '.join(valid)}"
        )
    return factory(**kwargs)


def positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int >= 1 (integral floats accepted), else raise MudscError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MudscError(f"argument {name!r} must be a positive integer, got {value!r}")
    if value != int(value) or value < 1:
        raise MudscError(f"argument {name!r} must be a positive integer, got {value!r}")
    return int(value)


def positive_float(name: str, value: object) -> float:
    """Return ``value`` as a finite float > 0, else raise MudscError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MudscError(f"argument {name!r} must be a positive number, got {value!r}")
    if not value > 0 or value == float("inf"):
        raise MudscError(f"argument {name!r} must be a positive finite number, got {value!r}")
    return float(value)


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels * width`` rounded, never below 1."""
    return max(1, int(round(channels * width)))


def common_args(in_channels: object, image_size: object, embed_dim: object) -> dict[str, int]:
    """Validate the three arguments every zoo model takes."""
    return {
        "in_channels": positive_int("in_channels", in_channels),
        "image_size": positive_int("image_size", image_size),
        "embed_dim": positive_int("embed_dim", embed_dim),
    }
