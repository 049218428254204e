"""The rule registries: one rule per layer type, per function and per tensor method.

A rule is ``rule(ctx) -> value``: it reads its inputs' layouts from the :class:`Ctx`,
records members, taps and constraints, and returns the output layouts (a ``TDims``, a
``Stacked``, or a tuple of them).  Users extend tracing to their own modules and ops::

    @mudsc.spaces.register_module_rule(MyScale)
    def _(ctx):
        x = ctx.tensor(0)
        ctx.member(f"{ctx.path}.gain", 0, x.dims[1], "producer")
        return x

or, without touching the default registry, for one call::

    extra = Rules()
    extra.module(MyScale)(rule)
    mudsc.trace(model, x, rules=extra)

Module rules live in the layer types (:mod:`mudsc.layers`), with the rest of what the
package knows about a layer.  A module with a rule is traced as a leaf (its ``forward``
is not entered).  Anything without a rule is *unsupported*: the spaces it touches are
fixed and a warning is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from mudsc.layers import LAYERS, LayerTypes, Rule

R = TypeVar("R", bound=Rule)


class Rules:
    """Module rules (by layer type), function rules and tensor-method rules."""

    def __init__(
        self,
        layers: LayerTypes | None = None,
        functions: dict[Any, Rule] | None = None,
        methods: dict[str, Rule] | None = None,
    ) -> None:
        self.layers = layers if layers is not None else LayerTypes()
        self.functions: dict[Any, Rule] = functions if functions is not None else {}
        self.methods: dict[str, Rule] = methods if methods is not None else {}

    # -- registration -------------------------------------------------------------------
    def module(self, *types: type[nn.Module]) -> Callable[[R], R]:
        """Register ``rule`` for modules of these types (and subclasses keeping forward)."""

        def decorator(rule: R) -> R:
            self.layers.set_rule(tuple(types), rule)
            return rule

        return decorator

    def function(self, *functions: Any) -> Callable[[R], R]:
        """Register ``rule`` for these callables (``torch.add``, ``operator.add``, ``F.relu``,
        an ATen op ``torch.ops.aten.add`` for all its overloads, or one overload)."""

        def decorator(rule: R) -> R:
            for f in functions:
                self.functions[f] = rule
            return rule

        return decorator

    def method(self, *names: str) -> Callable[[R], R]:
        """Register ``rule`` for tensor methods by name (``"view"``, ``"softmax"``...)."""

        def decorator(rule: R) -> R:
            for n in names:
                self.methods[n] = rule
            return rule

        return decorator

    # -- lookup -------------------------------------------------------------------------
    def module_rule(self, module: nn.Module) -> Rule | None:
        """The rule of a module's layer type (exact type, or a base whose forward it keeps)."""
        layer = self.layers.of(module)
        return layer.rule if layer is not None else None

    def function_rule(self, target: Any) -> Rule | None:
        """The rule of a callable; an ATen overload (``aten.add.Tensor``) falls back to the
        rule of its packet (``aten.add``)."""
        try:
            rule = self.functions.get(target)
        except TypeError:  # unhashable target
            return None
        packet = getattr(target, "overloadpacket", None)
        return rule if rule is not None or packet is None else self.functions.get(packet)

    def method_rule(self, name: str) -> Rule | None:
        return self.methods.get(name)

    def over(self, base: Rules) -> Rules:
        """A new registry: these rules first, then ``base``'s (neither is changed)."""
        return Rules(
            self.layers.over(base.layers),
            {**base.functions, **self.functions},
            {**base.methods, **self.methods},
        )


RULES = Rules(LAYERS)
"""The default registry: the built-in rules and those registered by users."""


def register_module_rule(*types: type[nn.Module]) -> Callable[[R], R]:
    """Register a module rule in the default registry (see :meth:`Rules.module`)."""
    return RULES.module(*types)


def register_function_rule(*functions: Any) -> Callable[[R], R]:
    """Register a function rule in the default registry (see :meth:`Rules.function`)."""
    return RULES.function(*functions)


def register_method_rule(*names: str) -> Callable[[R], R]:
    """Register a tensor-method rule in the default registry (see :meth:`Rules.method`)."""
    return RULES.method(*names)
