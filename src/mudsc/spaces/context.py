"""What a rule sees and records while the traced graph is analysed.

A rule reads the layouts of its tensor inputs (:class:`TDims`), returns the layouts of
its outputs, and records facts: parameter *members*, *taps*, *mixes* (axes an op reduces
or contracts, needed to decide whether heads may be permuted independently), group
constraints, block-order ties and name hints.  All records of one node are discarded if
its rule fails, so a half-applied rule never leaks into the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from mudsc.spaces.atoms import Atoms, Layout, Unsplittable


@dataclass(frozen=True)
class Meta:
    """Shape and dtype of a tensor seen while running the example input."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class TDims:
    """Layouts of every dimension of one tensor; ``param`` names a state tensor (get_attr)."""

    dims: tuple[Layout, ...]
    shape: tuple[int, ...]
    param: str | None = None

    @property
    def ndim(self) -> int:
        return len(self.dims)


@dataclass(frozen=True)
class Stacked:
    """A tensor whose ``axis`` indexes independent parts (qkv after its reshape, torch.stack).

    Selecting along ``axis`` gives a part; any other use collapses it (parts unioned).
    """

    axis: int
    parts: tuple[TDims, ...]
    shape: tuple[int, ...]


Value = TDims | Stacked | tuple | list | None


def has_tensor(meta: Any) -> bool:
    """Whether a node's result summary holds a tensor (possibly inside tuples or dicts)."""
    if isinstance(meta, Meta):
        return True
    if isinstance(meta, tuple | list) and not isinstance(meta, torch.Size):
        return any(has_tensor(m) for m in meta)
    if isinstance(meta, dict):
        return any(has_tensor(m) for m in meta.values())
    return False


@dataclass
class MemberRec:
    tensor: str
    axis: int
    layout: Layout
    role: str
    order: int
    per_group: bool = False


@dataclass
class TapRec:
    module: str
    side: str
    arg: int
    axis: int
    layout: Layout
    kind: str  # "consumer" (preferred), "producer" (fallback) or "project"
    order: int
    project_weight: str | None = None
    project_bias: str | None = None
    project_start: int = 0


@dataclass
class Records:
    """Everything the rules recorded; turned into spaces by :mod:`mudsc.spaces.build`."""

    members: list[MemberRec] = field(default_factory=list)
    taps: list[TapRec] = field(default_factory=list)
    tensors: list[tuple[Layout, ...]] = field(default_factory=list)
    mixes: list[tuple[tuple[Layout, ...], int]] = field(default_factory=list)
    groups: list[tuple[Layout, int, str]] = field(default_factory=list)
    ties: list[tuple[Layout, Layout, str]] = field(default_factory=list)
    hints: list[tuple[Layout, str]] = field(default_factory=list)
    residuals: list[tuple[Layout, str]] = field(default_factory=list)
    fixed_by: list[tuple[str, list[Layout]]] = field(default_factory=list)
    consumed: list[tuple[str, int]] = field(default_factory=list)

    def mark(self) -> tuple[int, ...]:
        return tuple(len(v) for v in vars(self).values())

    def rollback(self, mark: tuple[int, ...]) -> None:
        for value, n in zip(vars(self).values(), mark, strict=True):
            del value[n:]


class Ctx:
    """The view of one fx node that a rule works with."""

    def __init__(
        self,
        atoms: Atoms,
        records: Records,
        node: fx.Node,
        path: str,
        module: nn.Module | None,
        args: tuple,
        kwargs: dict[str, Any],
        out: Any,
        order: int,
        dependent: set[fx.Node],
    ) -> None:
        self.atoms, self.records, self.node = atoms, records, node
        self.path, self.module, self.order = path, module, order
        self.args, self.kwargs, self.out = args, kwargs, out
        self.dependent = dependent

    # -- inputs -----------------------------------------------------------------------
    def tensor(self, i: int | str, default: Any = None) -> TDims | None:
        """Argument ``i`` (position or keyword) as layouts; stacked values are collapsed."""
        value = self.get(i, default)
        if isinstance(value, Stacked):
            return self.collapse(value)
        return value if isinstance(value, TDims) else None

    def get(self, i: int | str, default: Any = None) -> Any:
        if isinstance(i, int):
            return self.args[i] if i < len(self.args) else default
        return self.kwargs.get(i, default)

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional ``i`` or keyword ``name``."""
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)

    def out_shape(self, index: int | None = None) -> tuple[int, ...]:
        out = self.out if index is None else self.out[index]
        if not isinstance(out, Meta):
            raise Unsplittable(f"expected a tensor output, got {type(out).__name__}")
        return out.shape

    def collapse(self, value: Stacked) -> TDims:
        """Forget that parts were independent: union them; the stack axis is fixed."""
        first = value.parts[0]
        for part in value.parts[1:]:
            for x, y in zip(first.dims, part.dims, strict=True):
                self.union(x, y)
        stack = self.atoms.layout(len(value.parts), fixed="stack axis")
        dims = list(first.dims)
        dims.insert(value.axis, stack)
        return self.record(TDims(tuple(dims), value.shape))

    # -- outputs and records ----------------------------------------------------------
    def fresh(self, size: int, spatial: bool = False) -> Layout:
        return self.atoms.layout(size, spatial=spatial)

    def record(self, td: TDims) -> TDims:
        self.records.tensors.append(td.dims)
        return td

    def union(self, x: Layout, y: Layout) -> None:
        self.atoms.union_layouts(x, y)

    def member(
        self, tensor: str, axis: int, layout: Layout, role: str, per_group: bool = False
    ) -> None:
        self.records.members.append(MemberRec(tensor, axis, layout, role, self.order, per_group))

    def tap(
        self, side: str, arg: int, axis: int, layout: Layout, kind: str, **project: Any
    ) -> None:
        self.records.taps.append(
            TapRec(self.path, side, arg, axis, layout, kind, self.order, **project)
        )

    def consume(self, td: TDims, axis: int) -> None:
        """A contraction reads axis ``axis`` of ``td``: a state tensor's axis is a consumer."""
        if td.param is not None:
            self.records.consumed.append((td.param, axis % td.ndim))

    def activation(self, i: int) -> bool:
        """Whether positional argument ``i`` depends on the network input (not a parameter)."""
        arg = self.node.args[i] if i < len(self.node.args) else None
        return isinstance(arg, fx.Node) and arg in self.dependent

    def mix(self, td: TDims, axis: int) -> None:
        self.records.mixes.append((td.dims, axis % td.ndim))

    def groups(self, layout: Layout, groups: int, origin: str) -> None:
        self.records.groups.append((layout, groups, origin))

    def tie(self, x: Layout, y: Layout, name: str) -> None:
        self.records.ties.append((x, y, name))

    def hint(self, layout: Layout, name: str) -> None:
        self.records.hints.append((layout, name))
