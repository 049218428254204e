"""The model zoo's registry (name -> factory), plus the argument checks shared by the zoo.

Checkpoints store an architecture by name and keyword arguments, so every model must be
rebuildable from ``create(name, **config)``; keeping the lookup and the argument checks in
one place makes bad names and bad arguments fail with one clear message.  Arguments come
from hand-editable files (``config.json``, experiment YAML), so :func:`create` checks each
against the factory's annotations and builds the model on the meta device first: a
``hidden: 1e9`` is refused in milliseconds, before a byte of weights is allocated.
"""

from __future__ import annotations

import inspect
import numbers
import os
import reprlib
import threading
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.overrides import TorchFunctionMode

from mudsc.errors import ConfigError, ResourceError
from mudsc.registry import Registry

# Parameters, buffers and submodules registered while building: ResNet-50 has ~500; a build
# past this is a runaway loop (``depth: 1e9``), stopped before it spins for minutes.
MAX_PARTS = 5_000
GB = 1024**3

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
    """Build the architecture registered as ``name`` with keyword arguments ``kwargs``.

    The arguments are checked first (:func:`check_args`), then the model is built on the
    meta device to count its weights; above this machine's RAM it is refused
    (:class:`ResourceError`) before anything real is allocated.
    """
    factory = MODELS.get(name).factory
    check_args(name, kwargs)
    nbytes = _meta_bytes(name, factory, kwargs)
    if nbytes is not None:
        check_memory(nbytes, f"architecture {name!r} with arguments {shown(kwargs)}")
    return factory(**kwargs)


def check_args(name: str, kwargs: Mapping[str, object]) -> None:
    """Refuse unknown argument names and values whose type the factory's annotations rule out
    (a bool or a float where an int is annotated, text where a number is)."""
    factory = MODELS.get(name).factory
    params = _parameters(factory)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in kwargs.items():
        if not isinstance(key, str) or (key not in params and not accepts_any):
            valid = [k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
            raise ConfigError(
                f"architecture {name!r} has no argument {shown(key)}; "
                f"valid arguments: {', '.join(valid)}"
            )
        annotation = params[key].annotation if key in params else Any
        if not fits(value, annotation):
            raise ConfigError(
                f"argument {key!r} of architecture {name!r} must be {expected(annotation)}, "
                f"got {given(value)}"
            )


def _parameters(factory: Callable[..., nn.Module]) -> Mapping[str, inspect.Parameter]:
    """The factory's parameters with annotations evaluated (left as Any where they cannot be:
    a user's factory may annotate with names it never imports at runtime)."""
    try:
        return inspect.signature(factory, eval_str=True).parameters
    except (NameError, TypeError, SyntaxError, AttributeError):
        return {
            k: p.replace(annotation=Any) for k, p in inspect.signature(factory).parameters.items()
        }


def fits(value: object, annotation: Any) -> bool:
    """Whether ``value`` is of the scalar type ``annotation`` names (int, float, bool, str,
    None and unions of them); any other annotation accepts everything."""
    if annotation in (Any, inspect.Parameter.empty, object):
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:  # numbers.Integral: numpy integers too
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is None or annotation is type(None):
        return value is None
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in typing.get_args(annotation))
    return True


def expected(annotation: Any) -> str:
    """Words for what :func:`fits` accepts under ``annotation``."""
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             type(None): "null", None: "null"}  # fmt: skip
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(expected(a) for a in typing.get_args(annotation))
    return words.get(annotation, getattr(annotation, "__name__", str(annotation)))


def given(value: object) -> str:
    """A value as an error message shows it: capped at ~100 characters, with its kind."""
    kinds = {bool: "true/false", int: "an integer", float: "a float", str: "a string",
             type(None): "null"}  # fmt: skip
    if isinstance(value, Mapping):
        kind = "a mapping"
    elif isinstance(value, list | tuple):
        kind = "a list"
    else:
        kind = kinds.get(type(value), f"a {type(value).__name__}")
    return f"{shown(value)} ({kind})"


def shown(value: object, limit: int = 100) -> str:
    """``repr(value)`` bounded in work and length: a YAML alias bomb's repr would be gigabytes."""
    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxstring, bounded.maxother = 3, limit, limit
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = 8
    text = bounded.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_memory(nbytes: int, what: str) -> None:
    """Refuse ``nbytes`` of tensors that this machine's RAM cannot hold (one line, in GB)."""
    ram = machine_memory()
    if ram is not None and nbytes > ram:
        raise ResourceError(
            f"{what} needs at least {nbytes / GB:.1f} GB of weights, more than this machine's "
            f"{ram / GB:.1f} GB of RAM; choose smaller arguments"
        )


def machine_memory() -> int | None:
    """Physical RAM in bytes (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


class _TooLarge(Exception):
    """Raised inside the meta build to stop it as soon as it is known to be too large."""

    def __init__(self, nbytes: int, parts: int) -> None:
        super().__init__(nbytes, parts)
        self.nbytes, self.parts = nbytes, parts


def _meta_bytes(name: str, factory: Callable[..., nn.Module], kwargs: Mapping) -> int | None:
    """Bytes of the parameters and buffers ``factory(**kwargs)`` would allocate, counted on the
    meta device; None when the factory cannot build there (it is then built for real)."""
    budget = machine_memory() or 2**63
    try:
        with _counting(budget) as counted, torch.device("meta"), _SkipInPlaceOnMeta():
            factory(**kwargs)
        return counted[0]
    except _TooLarge as stop:
        if stop.parts > MAX_PARTS:
            raise ResourceError(
                f"architecture {name!r} with arguments {shown(kwargs)} builds more than "
                f"{MAX_PARTS} parameters, buffers and submodules; choose smaller arguments"
            ) from None
        return stop.nbytes
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel
        return None


class _SkipInPlaceOnMeta(TorchFunctionMode):
    """In-place ops on meta tensors (weight initialisation) are skipped: they change no
    shape, and some run as Python decompositions whose first call imports torch._dynamo
    (about 1.5 s of every command's start-up)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        in_place = name.endswith("_") and not name.startswith("_")  # not __bool__, __iadd__
        if in_place and isinstance(first, torch.Tensor) and first.is_meta:
            return first
        return func(*args, **(kwargs or {}))


@contextmanager
def _counting(budget: int) -> Iterator[list[int]]:
    """Tally [bytes, parts] registered by this thread; stop the build past either limit."""
    owner = threading.get_ident()
    counted = [0, 0]

    def count(_module: nn.Module, _name: str, value: object) -> None:
        if value is None or threading.get_ident() != owner:
            return
        counted[1] += 1
        if isinstance(value, torch.Tensor):
            counted[0] += value.numel() * value.element_size()
        if counted[0] > budget or counted[1] > MAX_PARTS:
            raise _TooLarge(counted[0], counted[1])

    handles = [
        torch_module.register_module_parameter_registration_hook(count),
        torch_module.register_module_buffer_registration_hook(count),
        torch_module.register_module_module_registration_hook(count),
    ]
    try:
        yield counted
    finally:
        for handle in handles:
            handle.remove()


def positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int >= 1 (integral floats accepted), else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"argument {name!r} must be a positive integer, got {value!r}")
    if value != int(value) or value < 1:
        raise ConfigError(f"argument {name!r} must be a positive integer, got {value!r}")
    return int(value)


def positive_float(name: str, value: object) -> float:
    """Return ``value`` as a finite float > 0, else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"argument {name!r} must be a positive number, got {value!r}")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"argument {name!r} must be a positive finite number, got {value!r}")
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
