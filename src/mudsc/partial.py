"""Partial merging (ZipIt!'s partial zip, docs/ALGORITHM.md section 6): one merged trunk, N heads.

The model's torch.fx graph (the one the tracer analyses) is cut in two at a stop point:

* the **trunk** is every node up to the cut, built as an ``fx.GraphModule`` carrying the
  merged weights; it returns the values that cross the cut (one stage output, or several
  tensors when the cut falls inside a residual block);
* **head i** is every later node, carrying model i's *original* weights and taking the
  crossing values as inputs;
* between them, ``unmerges[i]`` maps each crossing tensor from the merged basis back to
  model i's: ``x_i[..., u] = sum_k U_i[u, k] x[..., k]`` on every slice of every axis that
  holds a trunk space; everything else (fixed spaces, batch, spatial and token axes)
  passes unchanged.  Because the whole head works in model i's basis, this is exact for a
  permutation and is ZipIt!'s "first unmerged layer receives U on its input axis" in
  general, wherever the cut falls, residual streams included.

Stop points are named by module path or by a count of spaces, never by a graph node:

* ``"layer2"`` (a module path): the trunk ends after the last op that runs inside that
  module in forward order;
* ``k`` (an int): the trunk is the shortest prefix of the forward order that *completes*
  k merge spaces, a space being complete once every op that reads one of its producer
  tensors is in the trunk.  (Spec order is not used: a residual space is listed where it
  starts, the stem, but it is only finished at the end of its stage.)

The trunk is always a prefix of the forward (execution) order.  Parameter-only nodes (a
``get_attr`` of ``cls_token`` and what is computed from it alone) belong to the side that
uses them; a head that needs one recomputes it from its own model's weights.

Which slices of a crossing tensor belong to which space is read off the tracer's own
layout analysis (the same union-find that defines the spaces, kept in the
:class:`~mudsc.spaces.TracedModel`), so it is exact for channel concatenations, fused
projections and flattened maps alike.  Nothing here traces: the caller traces once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn

from mudsc.apply import apply_matches, check_matches, contract_axis
from mudsc.errors import CheckpointError, ConfigError, MudscError, SpecError
from mudsc.models.registry import given
from mudsc.solvers.match import Match, identity_match
from mudsc.spaces.build import Key
from mudsc.spaces.context import Stacked, TDims, has_tensor
from mudsc.spaces.spec import Member, MergeSpec, Space
from mudsc.spaces.trace import TracedModel, trace_model

log = logging.getLogger(__name__)

FORMAT = "mudsc.partial/1"
# More heads than this is no merge anyone runs: a hand-edited record, refused before building.
MAX_MODELS = 1024
StopAt = str | int
Kind = Literal["units", "blocks", "split"]


# -- the stop point --------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """Where the trunk ends.

    ``position`` indexes the traced graph's node list (forward order) and is an
    implementation detail; ``node`` (fx name) and ``module`` (path of the last trunk op)
    are for display.  ``trunk_tensors`` are the state tensors the trunk reads.
    """

    stop_at: str | int
    position: int
    node: str
    module: str
    trunk_tensors: frozenset[str]


class _Graph:
    """The traced fx graph of one model, with what cutting it needs to know per node."""

    def __init__(self, traced: TracedModel) -> None:
        self.model_name = traced.model_name
        self.nodes: list[fx.Node] = traced.nodes
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        keys = list(traced.state_keys)
        self.reads = {n: _tensors_read(n, keys) for n in self.nodes}
        self.dependent: set[fx.Node] = set()
        for n in self.nodes:
            if n.op in ("placeholder", "output") or any(
                a in self.dependent for a in n.all_input_nodes
            ):
                self.dependent.add(n)
        # A parameter-only node takes effect where its first input-dependent user runs.
        self.eff: dict[fx.Node, int] = {}
        for n in reversed(self.nodes):
            users = [self.eff[u] for u in n.users]
            self.eff[n] = self.pos[n] if n in self.dependent or not users else min(users)

    def scopes(self, node: fx.Node) -> list[str]:
        """Module paths the node runs inside, outermost first (its own, for a leaf call)."""
        stack = node.meta.get("nn_module_stack") or {}
        paths = [str(path) for path, _ in stack.values()]
        if node.op == "call_module":
            parts = str(node.target).split(".")
            paths += [".".join(parts[: i + 1]) for i in range(len(parts))]
        return list(dict.fromkeys(paths))

    def module_of(self, node: fx.Node) -> str:
        scopes = self.scopes(node)
        return scopes[-1] if scopes else ""

    def trunk(self, position: int) -> set[fx.Node]:
        """Nodes that take effect at or before ``position`` (a prefix, closed under inputs)."""
        return {n for n in self.nodes if n.op != "output" and self.eff[n] <= position}


def _tensors_read(node: fx.Node, keys: list[str]) -> frozenset[str]:
    """State tensors a node reads directly: a leaf module's, or a get_attr's."""
    if node.op not in ("call_module", "get_attr"):
        return frozenset()
    target = str(node.target)
    return frozenset(k for k in keys if k == target or k.startswith(target + "."))


def _space_ends(g: _Graph, spec: MergeSpec) -> list[tuple[int, str]]:
    """(position at which the space is complete, name) for every mergeable space, sorted."""
    ends = []
    for index, s in enumerate(spec.mergeable):
        wanted = {m.tensor for m in s.producers} or {m.tensor for _, m in s.members()}
        readers = [g.eff[n] for n in g.nodes if g.reads[n] & wanted]
        if readers:
            ends.append((max(readers), index, s.name))
    ends.sort()
    return [(pos, name) for pos, _, name in ends]


def stop_choices(traced: TracedModel, spec: MergeSpec | None = None) -> tuple[list[str], int]:
    """Module paths (up to two levels, forward order) and the largest k a stop may name
    (``spec``: the spec to count spaces of, by default the traced one)."""
    return _choices(_Graph(traced), traced.spec if spec is None else spec)


def _choices(g: _Graph, spec: MergeSpec) -> tuple[list[str], int]:
    paths: dict[str, None] = {}
    for n in g.nodes:
        if n in g.dependent and n.op not in ("placeholder", "output"):
            for p in g.scopes(n):
                if p.count(".") < 2:
                    paths[p] = None
    return list(paths), len(_space_ends(g, spec))


def resolve_stop(traced: TracedModel, stop_at: StopAt, spec: MergeSpec | None = None) -> Cut:
    """Turn a module path or a space count (of ``spec``, by default the traced one) into a
    :class:`Cut` of the traced graph."""
    return _resolve(_Graph(traced), traced.spec if spec is None else spec, stop_at)


def _resolve(g: _Graph, spec: MergeSpec, stop_at: StopAt) -> Cut:
    if isinstance(stop_at, bool) or not isinstance(stop_at, str | int):
        raise ConfigError(
            f"stop_at must be a module path (str) or a number of spaces (int), got {stop_at!r}"
        )
    if isinstance(stop_at, int):
        ends = _space_ends(g, spec)
        if not 1 <= stop_at <= len(ends):
            raise ConfigError(
                f"cannot stop after {stop_at} spaces: the model has {len(ends)} merge spaces; "
                f"give k in 1..{len(ends)} or a module path ({_choice_text(g, spec)})"
            )
        position = ends[stop_at - 1][0]
    else:
        inside = [
            g.pos[n]
            for n in g.nodes
            if n in g.dependent and n.op not in ("placeholder", "output") and stop_at in g.scopes(n)
        ]
        if not inside:
            raise ConfigError(
                f"no module {stop_at!r} runs on the input of {g.model_name}; stop at "
                f"a module path ({_choice_text(g, spec)}, or any deeper path such as "
                f"'{_deep_example(g)}') or at a number of spaces"
            )
        position = max(inside)
    last = g.nodes[position]
    tensors = frozenset(t for n in g.trunk(position) for t in g.reads[n])
    return Cut(stop_at, position, last.name, g.module_of(last), tensors)


def _choice_text(g: _Graph, spec: MergeSpec) -> str:
    paths, k = _choices(g, spec)
    return f"one of {', '.join(paths) or 'none'}; or an int k in 1..{k}"


def _deep_example(g: _Graph) -> str:
    deep = [str(n.target) for n in g.nodes if n.op == "call_module" and n in g.dependent]
    return max(deep, key=lambda p: p.count("."), default="")


def trunk_spaces(spec: MergeSpec, cut: Cut) -> list[str]:
    """Mergeable spaces with any member the trunk reads: the matches the trunk needs."""
    return [
        s.name for s in spec.mergeable if any(m.tensor in cut.trunk_tensors for _, m in s.members())
    ]


# -- what crosses the cut --------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Where one trunk space sits in one crossing value (``item``: index path into a tuple
    value, ``()`` for a tensor).

    ``kind`` says how:

    * ``"units"``: its units, ``inner`` positions each, from ``start`` along ``axis``;
    * ``"blocks"``: only its blocks (heads) along ``axis``, e.g. per-head attention scores;
    * ``"split"``: blocks along ``axis`` and the units of a block along ``unit_axis``
      (q, k or v after the reshape into heads).
    """

    space: str
    axis: int
    start: int = 0
    inner: int = 1
    item: tuple[int, ...] = ()
    kind: Kind = "units"
    unit_axis: int | None = None
    groups: int = 1


@dataclass(frozen=True)
class Crossing:
    """One value the trunk hands to the heads: its fx node name and its space segments."""

    node: str
    segments: tuple[Segment, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "segments": [asdict(s) for s in self.segments]}


class _Layouts:
    """Reads the tracer's layout analysis of one model against the trunk spaces of a spec.

    A tensor axis lands on layout *keys*; a key is a whole space, or (for a head-grouped
    space of key (A, B)) only its block class A or unit class B when heads sit on an axis
    of their own.  Anything else that touches a trunk space cannot be unmerged: refused.
    """

    def __init__(self, traced: TracedModel, spec: MergeSpec, spaces: set[str]) -> None:
        self.traced = traced
        self.places = traced.placer()
        self.spaces = {s.name: s for s in spec.spaces if s.name in spaces}
        self.key_of = space_keys(traced, self.spaces.values())
        self.owners: dict[Key, set[str]] = defaultdict(set)
        # Head-grouped spaces, key (blocks, units): the block class is shared by tied spaces.
        self.block_of: dict[int, list[str]] = defaultdict(list)
        self.unit_of: dict[int, str] = {}
        for name, key in self.key_of.items():
            self.owners[key].add(name)
            if len(key) == 2:
                self.block_of[key[0]].append(name)
                self.unit_of[key[1]] = name
        self.atoms = {a for key in self.key_of.values() for a in key}

    def crossing(self, node: fx.Node) -> Crossing:
        out: list[Segment] = []
        self._walk(self.traced.values.get(node), self.traced.metas.get(node), (), out)
        return Crossing(node.name, tuple(out))

    def _walk(self, value: Any, meta: Any, item: tuple[int, ...], out: list[Segment]) -> None:
        if isinstance(value, Stacked):
            raise SpecError(
                "the cut falls between a fused projection and its split into parts (q/k/v); "
                "stop at the enclosing module instead"
            )
        if isinstance(value, TDims):
            out.extend(self._tensor(value, item))
        elif isinstance(value, tuple | list):
            metas = meta if isinstance(meta, tuple | list) else [None] * len(value)
            for i, (v, m) in enumerate(zip(value, metas, strict=False)):
                self._walk(v, m, (*item, i), out)
        elif has_tensor(meta):
            raise SpecError(
                "the tracer has no layout for a tensor that crosses the cut; stop at another module"
            )

    def _tensor(self, td: TDims, item: tuple[int, ...]) -> list[Segment]:
        out: list[Segment] = []
        blocks: dict[int, tuple[int, Any]] = {}  # block class -> (axis, place)
        units: dict[str, tuple[int, Any]] = {}  # grouped space -> (axis, place) of its units
        for axis, layout in enumerate(td.dims):
            for p in self.places(layout):
                if not self.atoms & set(p.key):
                    continue
                if not p.free:  # the tracer keeps it fixed, the spec merges it
                    raise _mismatch(_space_of(self, p.key))
                names = self.owners.get(p.key, set())
                atom = p.key[0] if len(p.key) == 1 else None
                if names:
                    name = next(iter(names))
                    if len(names) > 1 or self.spaces[name].size != p.key_size:
                        raise _mismatch(name)
                    for o in range(p.outer):
                        start = p.offset + o * p.key_size * p.inner
                        out.append(Segment(name, axis, start, p.inner, item))
                elif atom in self.block_of and atom not in blocks and p.outer == 1:
                    blocks[atom] = (axis, p)
                elif atom in self.unit_of and self.unit_of[atom] not in units and p.outer == 1:
                    units[self.unit_of[atom]] = (axis, p)
                else:
                    raise _unsplittable(_space_of(self, p.key))
        for name, (unit_axis, pu) in units.items():
            block = self.key_of[name][0]
            if block not in blocks:
                raise _unsplittable(name)
            axis, pb = blocks.pop(block)
            if any(p.offset or p.inner != 1 for p in (pb, pu)) or (
                td.shape[axis] * td.shape[unit_axis] != self.spaces[name].size
            ):
                raise _unsplittable(name)
            out.append(
                Segment(name, axis, 0, 1, item, "split", unit_axis, self.spaces[name].groups)
            )
        for block, (axis, p) in blocks.items():  # one value per head (attention scores)
            name = self.block_of[block][0]
            groups = self.spaces[name].groups
            out.append(Segment(name, axis, p.offset, p.inner, item, "blocks", None, groups))
        return out


def space_keys(traced: TracedModel, spaces: Iterable[Space]) -> dict[str, Key]:
    """Each space's layout key in ``traced``, found by what the space is, not by its name
    or full value: the traced space holding its producer slices (tensor, axis, start), so
    a renamed, re-serialised or re-flagged spec maps as well as the traced one."""
    owner: dict[tuple[str, int, int], str] = {}
    for s in traced.spec.spaces:
        for _, m in s.members():
            owner.setdefault((m.tensor, m.axis, m.start), s.name)
    out: dict[str, Key] = {}
    for s in spaces:
        members = s.producers or tuple(m for _, m in s.members())
        found = {owner.get((m.tensor, m.axis, m.start)) for m in members}
        if len(found) != 1 or None in found:
            where = ", ".join(sorted(str(f) for f in found if f is not None)) or "none"
            raise SpecError(
                f"space {s.name!r} of the given spec is not one space of the traced "
                f"{traced.model_name} (its producers lie in traced spaces: {where}); pass a "
                "spec that mudsc.trace derives for this model (renaming spaces is fine)"
            )
        out[s.name] = traced.keys[found.pop()]
    return out


def _space_of(layouts: _Layouts, key: tuple) -> str:
    for name, k in layouts.key_of.items():
        if set(k) & set(key):
            return name
    return "?"


def _mismatch(name: str) -> SpecError:
    return SpecError(
        f"the merge spec does not match the traced model at space {name!r} (edited by hand?); "
        "partial merging needs the spec that mudsc.trace derives for this model"
    )


def _unsplittable(name: str) -> SpecError:
    return SpecError(
        f"space {name!r} crosses the cut in a layout that cannot be unmerged; stop at another "
        "module (for example the one that encloses this one)"
    )


# -- the unmerge step ------------------------------------------------------------------


class Unmerge(nn.Module):
    """Model i's view of the trunk's outputs: ``x_i[..., u] = sum_k U_i[u, k] x[..., k]``.

    One per head; ``plans[j]`` lists the segments of crossing value j.  The U_i blocks are
    buffers (``u0``, ``u1``... in ``spaces`` order), so they follow ``.to()`` and the
    state dict.
    """

    def __init__(self, plans: Sequence[Sequence[Segment]], unmerge: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.plans = [tuple(p) for p in plans]
        self.spaces = list(dict.fromkeys(s.space for p in self.plans for s in p))
        for j, name in enumerate(self.spaces):
            self.register_buffer(f"u{j}", unmerge[name].detach().clone())

    def matrix(self, space: str) -> Tensor:
        """U_i of ``space`` (n x n): row u = model i's unit, column k = merged unit."""
        return getattr(self, f"u{self.spaces.index(space)}")

    def forward(self, *values: Any) -> tuple:
        if len(values) != len(self.plans):
            raise SpecError(f"Unmerge expects {len(self.plans)} values, got {len(values)}")
        out = []
        for value, plan in zip(values, self.plans, strict=True):
            for seg in plan:
                value = _at(value, seg.item, lambda t, s=seg: self._unmerge_segment(t, s))
            out.append(value)
        return tuple(out)

    def _unmerge_segment(self, t: Tensor, seg: Segment) -> Tensor:
        u = self.matrix(seg.space).to(t.dtype)
        if seg.kind == "blocks":
            return contract_axis(t, seg.axis, block_map(u, seg.groups).T, seg.start, seg.inner)
        if seg.kind == "split":
            x = t.movedim((seg.axis, seg.unit_axis), (-2, -1))
            y = contract_axis(x.flatten(-2), -1, u.T).unflatten(-1, x.shape[-2:])
            return y.movedim((-2, -1), (seg.axis, seg.unit_axis))
        return contract_axis(t, seg.axis, u.T, seg.start, seg.inner)


def block_map(unmerge: Tensor, groups: int) -> Tensor:
    """G x G 0/1 map of a block-respecting U_i: model block b -> the merged block it joins."""
    n = unmerge.shape[0]
    g = n // groups
    touched = unmerge.reshape(groups, g, groups, g).abs().sum((1, 3)) > 0
    return touched.to(unmerge.dtype)


def _at(value: Any, item: tuple[int, ...], fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with the tensor at index path ``item`` replaced by ``fn`` of it."""
    if not item:
        return fn(value)
    parts = list(value)
    parts[item[0]] = _at(parts[item[0]], item[1:], fn)
    return type(value)(parts) if type(value) in (tuple, list) else tuple(parts)


# -- splitting the graph ---------------------------------------------------------------


@dataclass
class _Split:
    cut: Cut
    spaces: list[str]
    crossings: list[Crossing]
    trunk_graph: fx.Graph
    head_graph: fx.Graph

    def trunk(self, model: nn.Module, state: Mapping[str, Tensor] | None = None) -> fx.GraphModule:
        gm = copy.deepcopy(fx.GraphModule(model, self.trunk_graph, class_name="PartialTrunk"))
        if state is not None:
            # tensors outside the merged state (non-persistent buffers such as BERT's
            # position ids) keep the values the graph module copied from the model
            gm.load_state_dict({k: state[k] for k in gm.state_dict() if k in state}, strict=False)
        return gm

    def head(self, model: nn.Module) -> fx.GraphModule:
        return copy.deepcopy(fx.GraphModule(model, self.head_graph, class_name="PartialHead"))


def _split(traced: TracedModel, spec: MergeSpec, stop_at: StopAt) -> _Split:
    g = _Graph(traced)
    cut = _resolve(g, spec, stop_at)
    trunk = g.trunk(cut.position)
    boundary = [
        n
        for n in g.nodes
        if n in trunk and n in g.dependent and any(u not in trunk for u in n.users)
    ]
    spaces = trunk_spaces(spec, cut)
    layouts = _Layouts(traced, spec, set(spaces))
    crossings = [layouts.crossing(b) for b in boundary]

    trunk_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in g.nodes:
        if n in trunk:
            env[n] = trunk_graph.node_copy(n, lambda a: env[a])
    trunk_graph.output(tuple(env[b] for b in boundary))

    head_graph = fx.Graph()
    henv = {b: head_graph.placeholder(b.name) for b in boundary}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in henv:  # a parameter-only trunk node: recompute from this head's weights
            henv[a] = head_graph.node_copy(a, lookup)
        return henv[a]

    for n in g.nodes:
        if n not in trunk:
            henv[n] = head_graph.node_copy(n, lookup)
    trunk_graph.lint()
    head_graph.lint()
    return _Split(cut, spaces, crossings, trunk_graph, head_graph)


# -- the partially merged model --------------------------------------------------------


class PartialMerge(nn.Module):
    """A merged trunk feeding one unmerged head per source model.

    ``forward(*inputs)`` stacks the heads' outputs into (N, batch, ...);
    ``forward_heads(*inputs)`` returns them as a list (any output type).
    """

    def __init__(
        self,
        trunk: fx.GraphModule,
        heads: Sequence[nn.Module],
        unmerges: Sequence[Unmerge],
        meta: Mapping[str, Any],
    ) -> None:
        super().__init__()
        if not heads or len(heads) != len(unmerges):
            raise SpecError("a partial merge needs one unmerge step per head, and >= 1 head")
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.unmerges = nn.ModuleList(unmerges)
        self.meta = json.loads(json.dumps(meta))

    @property
    def n_models(self) -> int:
        return len(self.heads)

    def forward_heads(self, *inputs: Any) -> list[Any]:
        shared = self.trunk(*inputs)
        return [head(*um(*shared)) for head, um in zip(self.heads, self.unmerges, strict=True)]

    def forward(self, *inputs: Any) -> Tensor:
        outs = self.forward_heads(*inputs)
        if not all(isinstance(o, Tensor) and o.shape == outs[0].shape for o in outs):
            raise SpecError(
                "the heads do not return tensors of one shape; use forward_heads() instead"
            )
        return torch.stack(outs)

    def to_record(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(state dict, JSON-able meta): with the architecture, enough to rebuild the model."""
        state = {k: v.detach().clone().contiguous() for k, v in self.state_dict().items()}
        return state, json.loads(json.dumps(self.meta))

    @classmethod
    def from_record(
        cls,
        make_model: Callable[[], nn.Module],
        example_input: Any,
        state: Mapping[str, Tensor],
        meta: Mapping[str, Any],
    ) -> PartialMerge:
        """Rebuild from :meth:`to_record`: trace a fresh model once, re-cut it, load tensors.

        Values are cast to the fresh model's dtype; build it in float64 to keep float64.
        """
        check_record(meta)
        n_models, stop_at, recorded = meta["n_models"], meta["stop_at"], meta["boundary"]
        _check_heads_in_state(state, n_models)
        try:
            spec = MergeSpec.from_dict(meta["spec"])
        except MudscError as exc:
            raise CheckpointError(f"partial-merge record field 'spec': {exc}") from None
        model = make_model()
        try:  # every space's size is bounded by the model's real tensors before any eye(n)
            spec.validate(model)
        except MudscError as exc:
            raise CheckpointError(f"partial-merge record field 'spec': {exc}") from None
        parts = _split(trace_model(model, example_input, verify=False), spec, stop_at)
        rebuilt = json.loads(json.dumps([c.to_dict() for c in parts.crossings]))
        if rebuilt != json.loads(json.dumps(recorded)):
            raise CheckpointError(
                "the rebuilt model is cut differently than the recorded one (another "
                "architecture, other arguments or another version?); rebuild it with the "
                "architecture and arguments it was merged with"
            )
        dtype = _float_dtype(model)
        sizes = {s.name: s.size for s in spec.spaces}
        unmerges = [
            Unmerge(
                [c.segments for c in parts.crossings],
                {s: torch.eye(sizes[s], dtype=dtype) for s in parts.spaces},
            )
            for _ in range(n_models)
        ]
        heads = [parts.head(model) for _ in range(n_models)]
        pm = cls(parts.trunk(model), heads, unmerges, meta)
        try:
            pm.load_state_dict(dict(state))
        except RuntimeError as exc:
            raise CheckpointError(
                f"the recorded tensors do not fit the rebuilt model: {str(exc).splitlines()[0]}; "
                "rebuild it with the architecture and arguments it was merged with"
            ) from exc
        return pm


def check_record(meta: Any) -> None:
    """Check a partial-merge record's fields (types, ``n_models`` in 2..:data:`MAX_MODELS`)
    before anything is built from it: one :class:`CheckpointError` naming the field."""
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"a partial-merge record must be a mapping, got {given(meta)}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"not a partial-merge record (format {given(meta.get('format'))}, expected {FORMAT!r})"
        )
    checks: dict[str, tuple[str, Callable[[Any], bool]]] = {
        "n_models": (f"an integer in 2..{MAX_MODELS}", _is_model_count),
        "stop_at": ("a module path or a number of spaces", _is_stop),
        "spec": ("a mapping with a 'spaces' list", _is_spec),
        "boundary": ("a list of {node, segments} mappings", _is_boundary),
        "trunk_spaces": ("a list of space names", _is_names),
        "cut": ("a mapping of {node, module} names", _is_cut),
    }
    for key, (must, ok) in checks.items():
        if key not in meta and key in ("trunk_spaces", "cut"):  # display only
            continue
        if key not in meta or not ok(meta[key]):
            raise CheckpointError(
                f"partial-merge record field {key!r} must be {must}, got {given(meta.get(key))}"
            )


def _is_model_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= MAX_MODELS


def _is_stop(value: Any) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


def _is_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("spaces"), list)


def _is_boundary(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(c, Mapping) and isinstance(c.get("node"), str)
        and isinstance(c.get("segments"), list)
        for c in value
    )  # fmt: skip


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_cut(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values())


def _check_heads_in_state(state: Mapping[str, Tensor], n_models: int) -> None:
    """The per-model tensors (``heads.i.*``, ``unmerges.i.*``) must number ``n_models``:
    a record claiming more heads than its tensors hold is refused before they are built."""
    held = {
        int(parts[1])
        for parts in (k.split(".", 2) for k in state)
        if parts[0] in ("heads", "unmerges") and len(parts) > 1 and parts[1].isdigit()
    }
    if held and held != set(range(n_models)):
        raise CheckpointError(
            f"partial-merge record field 'n_models' is {n_models} but the tensors hold "
            f"{len(held)} models' heads; the config does not belong to these weights"
        )


def _check_blocks(
    spec: MergeSpec, crossings: list[Crossing], matches: Mapping[str, Match], n: int
) -> None:
    """A per-head tensor can be unmerged only if each model head joins one merged head, the
    same one in every space tied to it (q/k and v of one attention)."""
    for seg in (s for c in crossings for s in c.segments if s.kind == "blocks"):
        tie = spec.space(seg.space).block_tie
        tied = [s.name for s in spec.mergeable if tie is not None and s.block_tie == tie]
        for i in range(n):
            ref = block_map(matches[seg.space].unmerge_of(i), seg.groups)
            maps = [block_map(matches[t].unmerge_of(i), seg.groups) for t in tied if t in matches]
            if not (ref.sum(1) == 1).all() or any(not torch.equal(ref, m) for m in maps):
                raise SpecError(
                    f"a per-head tensor of space {seg.space!r} crosses the cut, but model {i}'s "
                    "matches do not map each of its heads to one merged head (the same in all "
                    "tied spaces); use a group-respecting solver or stop at another module"
                )


def _trunk_only(
    spec: MergeSpec, parts: _Split, states: list[dict[str, Tensor]]
) -> tuple[MergeSpec, list[dict[str, Tensor]]]:
    """The trunk spaces with their trunk members, and the trunk tensors: all the trunk needs
    merged (the heads keep their own tensors)."""
    keep = parts.cut.trunk_tensors

    def only(members: tuple[Member, ...]) -> tuple[Member, ...]:
        return tuple(m for m in members if m.tensor in keep)

    spaces = tuple(
        dataclasses.replace(
            s,
            producers=only(s.producers),
            consumers=only(s.consumers),
            ignored=only(s.ignored),
        )
        for s in spec.mergeable
        if s.name in parts.spaces
    )
    return MergeSpec(spaces), [{k: v for k, v in st.items() if k in keep} for st in states]


def _float_dtype(model: nn.Module) -> torch.dtype:
    for t in model.state_dict().values():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def build_partial(
    models: Sequence[nn.Module],
    traced: TracedModel,
    matches: Mapping[str, Match],
    stop_at: StopAt,
    spec: MergeSpec | None = None,
) -> PartialMerge:
    """Merge ``models`` up to ``stop_at``; every later op stays per model.

    ``traced``: :func:`mudsc.spaces.trace_model` of the first model (nothing is traced
    here).  ``spec``: the spaces to merge, by default ``traced.spec``; a spec passed by hand
    must describe the same spaces (renamed or with spaces fixed is fine).  ``matches``
    needs an entry for every space of :func:`trunk_spaces` (a missing one is averaged as
    it is, identity, as in :func:`mudsc.apply.apply_matches`); matches of later spaces are
    ignored.  The source models are not modified; the result holds copies of their tensors.
    """
    spec = traced.spec if spec is None else spec
    models = list(models)
    if len(models) < 2:
        raise ConfigError(f"partial merging needs at least two models, got {len(models)}")
    spec.validate(models[0])
    check_matches(spec, matches, len(models))
    parts = _split(traced, spec, stop_at)
    full = {
        name: matches[name]
        if name in matches
        else identity_match(spec.space(name).size, len(models))
        for name in parts.spaces
    }
    missing = [n for n in parts.spaces if n not in matches]
    if missing:
        log.info("no match for trunk spaces %s: averaged as they are (identity)", missing)
    _check_blocks(spec, parts.crossings, full, len(models))
    merged = apply_matches(*_trunk_only(spec, parts, [m.state_dict() for m in models]), full)
    dtype = _float_dtype(models[0])
    plans = [c.segments for c in parts.crossings]
    unmerges = [
        Unmerge(plans, {s: full[s].unmerge_of(i).to(dtype) for s in parts.spaces})
        for i in range(len(models))
    ]
    meta = {
        "format": FORMAT,
        "stop_at": stop_at,
        "n_models": len(models),
        "cut": {"node": parts.cut.node, "module": parts.cut.module},
        "trunk_spaces": parts.spaces,
        "boundary": [c.to_dict() for c in parts.crossings],
        "spec": spec.to_dict(),
    }
    log.info(
        "partial merge: trunk ends after %s (%s), %d trunk spaces, %d crossing values",
        parts.cut.node, parts.cut.module or "<root>", len(parts.spaces), len(parts.crossings),
    )  # fmt: skip
    return PartialMerge(
        parts.trunk(models[0], merged), [parts.head(m) for m in models], unmerges, meta
    )
