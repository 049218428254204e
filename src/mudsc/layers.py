"""Layer types: everything the package knows about one kind of module, in one registration.

A :class:`LayerType` carries a module type's tracing rule (how its parameters index merge
spaces, see :mod:`mudsc.spaces.rules`), how normalisation after merging treats it (a
BatchNorm whose running statistics are re-estimated; an affine layer whose output REPAIR
may correct, along channels first or last) and whether it runs faster on channels-last
memory.  Tracing, renormalisation and the merge's memory-layout switch all ask this one
registry, so they cannot disagree about a layer::

    @mudsc.layers.register_layer(MyScaledLinear, channel_axis="last")
    def _(ctx):
        ...  # the tracing rule

The built-in layer types are registered by :mod:`mudsc.spaces.modules`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from torch import nn

if TYPE_CHECKING:
    from mudsc.spaces.context import Ctx, Value

    Rule = Callable[[Ctx], Value]
else:
    Rule = Callable[[Any], Any]

Norm = Literal["batchnorm", "affine"]
ChannelAxis = Literal["first", "last"]
R = TypeVar("R", bound=Callable[..., Any])


@dataclass(frozen=True)
class LayerType:
    """One kind of module and all the package knows about it.

    ``rule``: its tracing rule (a module with a rule is traced as a leaf), or None.
    ``norm``: ``"batchnorm"`` (running statistics, re-estimated after merging),
    ``"affine"`` (normalises each sample on its own: nothing to re-estimate) or None.
    ``channel_axis``: the output axis of its channels when REPAIR may correct its output
    (``"first"``: axis 1, ``"last"``: the last axis), None when REPAIR leaves it alone.
    ``channels_last``: whether it runs markedly faster on channels-last (NHWC) memory.
    """

    types: tuple[type[nn.Module], ...]
    rule: Rule | None = None
    norm: Norm | None = None
    channel_axis: ChannelAxis | None = None
    channels_last: bool = False


class LayerTypes:
    """A registry of layer types by module type; later registrations replace earlier ones."""

    def __init__(self, by_type: dict[type, LayerType] | None = None) -> None:
        self._by_type: dict[type, LayerType] = dict(by_type or {})

    def add(self, layer: LayerType) -> LayerType:
        for t in layer.types:
            self._by_type[t] = layer
        return layer

    def set_rule(self, types: tuple[type[nn.Module], ...], rule: Rule) -> None:
        """Give ``types`` a tracing rule, keeping what else is registered for each."""
        for t in types:
            known = self._by_type.get(t)
            self._by_type[t] = replace(known, rule=rule) if known else LayerType((t,), rule)

    def of(self, module: nn.Module) -> LayerType | None:
        """The layer type of a module: its exact type, or a registered base whose forward
        it keeps (a subclass that only adds attributes computes the same function)."""
        cls = type(module)
        if cls in self._by_type:
            return self._by_type[cls]
        for base in cls.__mro__[1:]:
            if base in self._by_type and cls.forward is base.forward:
                return self._by_type[base]
        return None

    def over(self, base: LayerTypes) -> LayerTypes:
        """A new registry: these layer types first, then ``base``'s (neither is changed)."""
        return LayerTypes({**base._by_type, **self._by_type})

    def __iter__(self) -> Iterator[LayerType]:
        return iter(dict.fromkeys(self._by_type.values()))


LAYERS = LayerTypes()
"""The default registry: the built-in layer types and those registered by users."""


def register_layer(
    *types: type[nn.Module],
    norm: Norm | None = None,
    channel_axis: ChannelAxis | None = None,
    channels_last: bool = False,
    layers: LayerTypes = LAYERS,
) -> Callable[[R], R]:
    """Register ``types`` as one layer type whose tracing rule is the decorated function."""

    def decorator(rule: R) -> R:
        layers.add(LayerType(tuple(types), rule, norm, channel_axis, channels_last))
        return rule

    return decorator


def layer_type(module: nn.Module, layers: LayerTypes = LAYERS) -> LayerType | None:
    return layers.of(module)


def is_batchnorm(module: nn.Module, layers: LayerTypes = LAYERS) -> bool:
    """Whether the module keeps BatchNorm running statistics (re-estimated after merging)."""
    lt = layers.of(module)
    return lt is not None and lt.norm == "batchnorm"


def has_batchnorm(model: nn.Module, layers: LayerTypes = LAYERS) -> bool:
    return any(is_batchnorm(m, layers) for m in model.modules())


def prefers_channels_last(model: nn.Module, layers: LayerTypes = LAYERS) -> bool:
    """Whether the model has a layer that runs faster on channels-last memory."""
    return any((lt := layers.of(m)) is not None and lt.channels_last for m in model.modules())


# The built-in layer types register themselves, with their tracing rules, on import.
import mudsc.spaces.modules  # noqa: E402, F401
