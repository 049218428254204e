"""MergeSpec: the merge spaces of a model, a frozen value that every later stage reads.

A *space* is a set of hidden units that must be reordered (or merged) together for the
network to keep computing the same function.  Its *members* say which slices of which
state-dict tensors index those units; its *taps* say where its features can be observed
during a forward pass.  The spec is plain data: it round-trips through JSON, so a user can
inspect, edit and pass it by hand.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from types import UnionType
from typing import Literal, get_args, get_origin, get_type_hints

import torch

from mudsc.errors import SpecError

Role = Literal["producer", "consumer", "ignored"]


@dataclass(frozen=True)
class Member:
    """A slice of one tensor axis whose positions are the units of a space.

    Unit ``u`` of the space occupies positions ``start + u*inner ... start + (u+1)*inner - 1``
    of ``axis`` (``inner > 1`` after flattening C x H x W into a Linear, for example).
    ``per_group`` marks the input axis of a grouped convolution: the axis holds only one
    group's units (``size // groups`` of them) and which group is decided by the
    output-channel axis of the same tensor.
    """

    tensor: str
    axis: int
    start: int = 0
    inner: int = 1
    per_group: bool = False

    def stop(self, size: int) -> int:
        """End of the slice along ``axis`` for a space of ``size`` units."""
        return self.start + size * self.inner


@dataclass(frozen=True)
class Tap:
    """Where the features of a space are observed: a module's input or output.

    The observed tensor has the space's units along ``axis`` at positions
    ``start ... start + size - 1``; every other axis (batch, spatial, token) is an
    observation (``inner > 1``: each unit spans ``inner`` consecutive positions, which are
    observations too).  ``project`` (a weight key and optional bias key with a row offset) is for
    leaf modules that compute the space internally, e.g. ``nn.MultiheadAttention``'s
    q/k: the observed feature is then ``F.linear(x, W[start:start+size], b[...])`` of the
    tapped tensor ``x``.
    """

    module: str
    side: Literal["input", "output"] = "input"
    axis: int = 1
    start: int = 0
    inner: int = 1
    arg: int = 0
    project_weight: str | None = None
    project_bias: str | None = None
    project_start: int = 0


@dataclass(frozen=True)
class Space:
    """One merge space: ``size`` units in ``groups`` equal blocks (heads, GN groups)."""

    name: str
    size: int
    groups: int = 1
    producers: tuple[Member, ...] = ()
    consumers: tuple[Member, ...] = ()
    ignored: tuple[Member, ...] = ()
    taps: tuple[Tap, ...] = ()
    fixed: bool = False
    block_tie: str | None = None

    @property
    def group_size(self) -> int:
        return self.size // self.groups

    def members(self) -> Iterable[tuple[Role, Member]]:
        """Every member with its role, producers first."""
        for m in self.producers:
            yield "producer", m
        for m in self.ignored:
            yield "ignored", m
        for m in self.consumers:
            yield "consumer", m


@dataclass(frozen=True)
class AxisUse:
    """Inverse view of a member: tensor axis ``axis`` carries ``space`` in ``role``."""

    space: str
    role: Role
    member: Member


@dataclass(frozen=True)
class MergeSpec:
    """All spaces of one architecture plus the warnings raised while deriving them."""

    spaces: tuple[Space, ...]
    warnings: tuple[str, ...] = field(default=())

    # -- lookup -----------------------------------------------------------------------
    def space(self, name: str) -> Space:
        for s in self.spaces:
            if s.name == name:
                return s
        raise SpecError(f"no space named {name!r}; spaces: {[s.name for s in self.spaces]}")

    @property
    def mergeable(self) -> tuple[Space, ...]:
        """The spaces a merge may permute or zip (every non-fixed one)."""
        return tuple(s for s in self.spaces if not s.fixed)

    def tensor_uses(self) -> dict[str, list[AxisUse]]:
        """For every tensor, which of its axes belong to which space (non-fixed only)."""
        uses: dict[str, list[AxisUse]] = {}
        for s in self.mergeable:
            for role, m in s.members():
                uses.setdefault(m.tensor, []).append(AxisUse(s.name, role, m))
        return uses

    def tie_groups(self) -> dict[str, tuple[str, ...]]:
        """Block-order ties: tie name -> names of the spaces that share one block order."""
        ties: dict[str, list[str]] = {}
        for s in self.mergeable:
            if s.block_tie is not None:
                ties.setdefault(s.block_tie, []).append(s.name)
        return {k: tuple(v) for k, v in ties.items()}

    # -- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"spaces": [asdict(s) for s in self.spaces], "warnings": list(self.warnings)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping) -> MergeSpec:
        """The spec of ``to_dict``'s layout; every field is checked for its name, type and
        range, and a bad one is refused naming it (``spaces[2].producers[0].axis``)."""
        if not isinstance(data, Mapping):
            raise SpecError(
                f"merge spec: expected an object {{'spaces': [...]}} as written by "
                f"`mudsc spec --json`, got {_kind(data)}"
            )
        unknown = sorted(str(k) for k in data if k not in ("spaces", "warnings"))
        if unknown:
            raise SpecError(f"merge spec: unknown field(s) {unknown}; known: spaces, warnings")
        if "spaces" not in data:
            raise SpecError("merge spec: the field 'spaces' is missing (a list of spaces)")
        spaces = _typed(data["spaces"], tuple[Space, ...], "spaces")
        warnings = _typed(data.get("warnings", []), tuple[str, ...], "warnings")
        names = [s.name for s in spaces]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SpecError(f"merge spec: space names must be unique, repeated: {repeated}")
        return cls(spaces=spaces, warnings=warnings)

    @classmethod
    def from_json(cls, text: str | bytes) -> MergeSpec:
        """The spec of ``to_json``'s text (read a file first: ``Path(p).read_text()``)."""
        if not isinstance(text, str | bytes | bytearray):
            raise SpecError(
                f"MergeSpec.from_json takes the JSON text, got {_kind(text)}; read the file "
                "first (Path(path).read_text())"
            )
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, deep nesting
            raise SpecError(f"merge spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    # -- checks and display -----------------------------------------------------------
    def validate(self, model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Check that every member names an existing tensor whose axis fits the space."""
        state = (
            model_or_state.state_dict()
            if isinstance(model_or_state, torch.nn.Module)
            else model_or_state
        )
        for s in self.spaces:
            for role, m in s.members():
                where = f"space {s.name!r} ({role} {m.tensor}, axis {m.axis})"
                if m.tensor not in state:
                    raise SpecError(
                        f"{where}: the model has no tensor {m.tensor!r}; the spec was made "
                        "for another model (trace this one with mudsc.trace)"
                    )
                t = state[m.tensor]
                if not -t.dim() <= m.axis < t.dim():
                    raise SpecError(f"{where}: tensor has only {t.dim()} axes")
                units = s.group_size if m.per_group else s.size
                if m.stop(units) > t.shape[m.axis]:
                    raise SpecError(
                        f"{where}: needs positions {m.start}..{m.stop(units) - 1} "
                        f"but the axis has length {t.shape[m.axis]}"
                    )

    def describe(self, full: bool = False) -> str:
        """A plain-text table, one row per space; module lists are shortened unless ``full``."""
        rows = [("space", "size", "groups", "fixed", "producers", "consumers", "taps")]
        for s in self.spaces:
            rows.append(
                (
                    s.name,
                    str(s.size),
                    str(s.groups) + (f" tie:{s.block_tie}" if s.block_tie else ""),
                    "yes" if s.fixed else "",
                    _modules(s.producers, full),
                    _modules(s.consumers, full),
                    _modules(s.taps, full, taps=True),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(line.rstrip() for line in lines)


def _modules(items: Iterable[Member] | Iterable[Tap], full: bool, taps: bool = False) -> str:
    """Module paths of members (or taps), in order, without repeats; at most 3 unless full."""
    names: list[str] = []
    for item in items:
        if taps:
            name = f"{item.module}:{'in' if item.side == 'input' else 'out'}"
        else:
            name = item.tensor.rpartition(".")[0] or item.tensor
        if name not in names:
            names.append(name)
    if not names:
        return "-"
    if full or len(names) <= 3:
        return ", ".join(names)
    return ", ".join(names[:3]) + f" +{len(names) - 3} more"


# -- parsing the JSON layout ----------------------------------------------------------

_RECORDS = (Member, Tap, Space)
# Fields that count or index positions: the least value each may take.
_AT_LEAST = {"size": 1, "groups": 1, "start": 0, "inner": 1, "arg": 0, "project_start": 0}


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _typed(value: object, hint: object, where: str) -> object:
    """``value`` checked against the type ``hint`` of a spec field (records recursively)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is tuple:  # tuple[X, ...] is a JSON list of X
        if not isinstance(value, list | tuple):
            raise SpecError(f"merge spec: {where} must be a list, got {_kind(value)}")
        return tuple(_typed(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        if value not in args:
            raise SpecError(f"merge spec: {where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is UnionType:  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint in _RECORDS:
        return _record(hint, value, where)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        name = getattr(hint, "__name__", str(hint))
        raise SpecError(f"merge spec: {where} must be of type {name}, got {value!r}")
    return value


def _record(cls: type, data: object, where: str) -> object:
    """One Member, Tap or Space from its JSON object: known fields, typed, in range."""
    if not isinstance(data, Mapping):
        raise SpecError(f"merge spec: {where} must be an object, got {_kind(data)}")
    hints = get_type_hints(cls)
    unknown = sorted(str(k) for k in data if k not in hints)
    if unknown:
        raise SpecError(
            f"merge spec: {where} has unknown field(s) {unknown}; known: {', '.join(hints)}"
        )
    values = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is MISSING:
                raise SpecError(f"merge spec: {where} lacks the field {f.name!r}")
            continue
        value = _typed(data[f.name], hints[f.name], f"{where}.{f.name}")
        least = _AT_LEAST.get(f.name)
        if least is not None and value < least:
            raise SpecError(f"merge spec: {where}.{f.name} must be >= {least}, got {value}")
        values[f.name] = value
    record = cls(**values)
    if isinstance(record, Space) and record.size % record.groups:
        raise SpecError(
            f"merge spec: {where}: size {record.size} must be a multiple of groups {record.groups}"
        )
    return record
