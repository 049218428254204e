"""The rule registry: one rule per module type, per function and per tensor method.

A rule is ``rule(ctx) -> value``: it reads its inputs' layouts from the :class:`Ctx`,
records members, taps and constraints, and returns the output layouts (a ``TDims``, a
``Stacked``, or a tuple of them).  Users extend tracing to their own modules and ops::

    @mudsc.spaces.register_module_rule(MyScale)
    def _(ctx):
        x = ctx.tensor(0)
        ctx.member(f"{ctx.path}.gain", 0, x.dims[1], "producer")
        return x

A module with a rule is traced as a leaf (its ``forward`` is not entered).  Anything
without a rule is *unsupported*: the spaces it touches are fixed and a warning is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from mudsc.spaces.context import Ctx, Value

Rule = Callable[[Ctx], Value]
R = TypeVar("R", bound=Rule)

_MODULES: dict[type, Rule] = {}
_FUNCTIONS: dict[Any, Rule] = {}
_METHODS: dict[str, Rule] = {}


def register_module_rule(*types: type[nn.Module]) -> Callable[[R], R]:
    """Register ``rule`` for modules of exactly these types (and subclasses keeping forward)."""

    def decorator(rule: R) -> R:
        for t in types:
            _MODULES[t] = rule
        return rule

    return decorator


def register_function_rule(*functions: Any) -> Callable[[R], R]:
    """Register ``rule`` for these callables (``torch.add``, ``operator.add``, ``F.relu``...)."""

    def decorator(rule: R) -> R:
        for f in functions:
            _FUNCTIONS[f] = rule
        return rule

    return decorator


def register_method_rule(*names: str) -> Callable[[R], R]:
    """Register ``rule`` for tensor methods by name (``"view"``, ``"softmax"``...)."""

    def decorator(rule: R) -> R:
        for n in names:
            _METHODS[n] = rule
        return rule

    return decorator


def module_rule(module: nn.Module) -> Rule | None:
    """The rule for a module: its exact type, or a registered base whose forward it keeps."""
    cls = type(module)
    if cls in _MODULES:
        return _MODULES[cls]
    for base in cls.__mro__[1:]:
        if base in _MODULES and cls.forward is base.forward:
            return _MODULES[base]
    return None


def function_rule(target: Any) -> Rule | None:
    try:
        return _FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None


def method_rule(name: str) -> Rule | None:
    return _METHODS.get(name)
