"""``trace_model(model, example_input) -> TracedModel``: merge spaces from a traced graph.

Steps: capture (:mod:`mudsc.spaces.capture`: torch.fx symbolic tracing, where standard
``torch.nn`` modules and modules with a rule are leaves, or torch.export), one run on
the example input to learn every shape, then every node's rule in graph order (see
:mod:`mudsc.spaces.rules`), then :func:`mudsc.spaces.build.build`.  Nodes without a rule
are *unsupported*: the spaces they touch are fixed and reported in ``spec.warnings``.
Finally the spec is checked numerically (``verify=True``).

The result keeps what later stages that work on the graph need (partial merging cuts
it), so a model is traced and analysed once; :func:`trace` returns just the spec.
"""

from __future__ import annotations

import builtins
import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

import mudsc.spaces.functions  # noqa: F401  (registers the built-in function rules)
from mudsc.errors import ConfigError, DataError, SpecError
from mudsc.modes import eval_mode
from mudsc.spaces.atoms import Atoms, Layout
from mudsc.spaces.build import Key, Place, build, places
from mudsc.spaces.capture import Route, as_module, capture, first_line
from mudsc.spaces.context import (
    Ctx,
    MemberRec,
    Meta,
    Records,
    Stacked,
    TDims,
    Value,
    has_tensor,
)  # fmt: skip
from mudsc.spaces.module_taps import add_module_taps
from mudsc.spaces.modules import register_library_layers
from mudsc.spaces.rules import RULES, Rules
from mudsc.spaces.spec import MergeSpec
from mudsc.spaces.verify import verify_spec

log = logging.getLogger(__name__)

_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "get_device", "element_size", "ndimension"}
_SHAPE_FUNCS = {builtins.getattr, builtins.len, builtins.isinstance}


@dataclass(frozen=True)
class TracedModel:
    """One traced model: its spec and the analysis behind it, computed once.

    ``graph`` is the fx graph (its nodes index ``metas``, the shape summary of each node's
    result on the example input, and ``values``, the layouts of each node's result).
    ``keys`` maps each space of ``spec`` to its layout key: :meth:`placer` of a layout
    lands on these keys, which is how a tensor's axes are read back as spaces.
    ``state_keys`` are the model's state-dict keys, in order.  ``route``: how the graph
    was captured, ``"fx"`` (torch.fx symbolic tracing) or ``"export"`` (torch.export,
    ATen ops outside the modules with a layer type).
    """

    spec: MergeSpec
    graph: fx.GraphModule
    metas: Mapping[fx.Node, Any]
    values: Mapping[fx.Node, Value]
    keys: Mapping[str, Key]
    atoms: Atoms
    state_keys: tuple[str, ...]
    model_name: str
    route: str = "fx"

    def placer(self) -> Callable[[Layout], list[Place]]:
        """:func:`mudsc.spaces.build.places` over a private copy of the atoms: reading the
        layout of a value the builder never placed may fix classes (an interleaved
        concatenation), which must not leak into this shared result."""
        atoms = copy.deepcopy(self.atoms)
        return lambda layout: places(atoms, layout)

    @property
    def nodes(self) -> list[fx.Node]:
        """The graph's nodes in forward (execution) order."""
        return list(self.graph.graph.nodes)


def trace_model(
    model: nn.Module,
    example_input: Any,
    *,
    rules: Rules | None = None,
    verify: bool = True,
    route: Route = "auto",
) -> TracedModel:
    """Trace ``model`` on ``example_input`` into its merge spec and the analysis behind it.

    ``example_input`` is a tensor or a tuple of positional inputs (a small batch is
    enough).  ``rules``: extra rules for this call only, used before the default registry
    (which is left unchanged).  With ``verify`` the spec is checked by permuting a float64
    copy of the model at random; any space that breaks the output is fixed and reported.
    ``route``: ``"fx"``, ``"export"`` or ``"auto"`` (fx, else export: see
    :mod:`mudsc.spaces.capture`).  A ``torch.export`` program (or its ``.module()``) is
    read by the export route.
    """
    if not isinstance(model, nn.Module | torch.export.ExportedProgram):
        raise ConfigError(
            f"tracing needs a torch.nn.Module (or a torch.export program), got "
            f"{type(model).__name__}"
        )
    register_library_layers()
    rules = RULES if rules is None else rules.over(RULES)
    inputs = example_input if isinstance(example_input, tuple | list) else (example_input,)
    _check_finite(inputs)
    model, exported = as_module(model)
    gm, taken = capture(model, tuple(inputs), rules, route, exported)
    metas = _shapes(gm, model, inputs)
    analysis = _Analysis(model, gm, metas, rules)
    analysis.run()
    spec, keys = build(analysis.atoms, analysis.records)
    spec = add_module_taps(model, spec, gm, analysis.values, keys, analysis.atoms, tuple(inputs))
    if verify:
        spec = verify_spec(model, spec, inputs, whole_batch=exported)
    return TracedModel(
        spec, gm, metas, analysis.values, keys, analysis.atoms,
        tuple(model.state_dict().keys()), type(model).__name__, taken,
    )  # fmt: skip


def _check_finite(inputs: Any) -> None:
    """Refuse NaN/inf in the example: the shapes would trace, but the numeric check of the
    spec and every statistic on it would be meaningless."""
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.is_meta:
            if not bool(torch.isfinite(x).all()):
                raise DataError(
                    f"example input {i} (in a merge: the first calibration batch) has NaN or "
                    "infinite values; pass real inputs"
                )


def trace(
    model: nn.Module,
    example_input: Any,
    *,
    rules: Rules | None = None,
    verify: bool = True,
    route: Route = "auto",
) -> MergeSpec:
    """The merge spec of ``model``: :func:`trace_model`'s spec (same arguments)."""
    return trace_model(model, example_input, rules=rules, verify=verify, route=route).spec


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps the shape (not the values) of every node's result."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # fx's own error decoration symbolises tracebacks: slow
        self.meta: dict[fx.Node, Any] = {}
        self.failed: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception:
            self.failed = self.failed or n
            raise
        self.meta[n] = _summary(result)
        return result


def _summary(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return Meta(tuple(value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return value
    if isinstance(value, tuple | list):
        return (
            type(value)(_summary(v) for v in value)
            if type(value) in (tuple, list)
            else tuple(_summary(v) for v in value)
        )
    if isinstance(value, dict):
        return {k: _summary(v) for k, v in value.items()}
    return value


def _shapes(gm: fx.GraphModule, model: nn.Module, inputs: tuple) -> dict[fx.Node, Any]:
    """Shapes of every node on the example input, run in eval mode without side effects."""
    recorder = _Recorder(gm)
    try:
        with eval_mode(model), torch.no_grad():
            recorder.run(*inputs)
    except Exception as exc:
        node = recorder.failed
        where = f" at '{_scope(node) or node.name}'" if node is not None else ""
        raise SpecError(
            f"running {type(model).__name__} on the example input failed{where}: "
            f"{first_line(exc)}.  "
            f"Pass an example input the model accepts (a small batch of the real input shape)."
        ) from exc
    return recorder.meta


def _tensors_in(value: Any) -> Iterable[TDims | Stacked]:
    if isinstance(value, TDims | Stacked):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)
    elif isinstance(value, slice):
        yield from _tensors_in((value.start, value.stop, value.step))


def _layouts(value: Any) -> list[Layout]:
    out: list[Layout] = []
    for t in _tensors_in(value):
        parts = t.parts if isinstance(t, Stacked) else (t,)
        for p in parts:
            out.extend(p.dims)
    return out


def _scope(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # aten.roll.default
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    if getattr(torch, name, None) is target:
        return f"torch.{name}"
    if getattr(torch.nn.functional, name, None) is target:
        return f"torch.nn.functional.{name}"
    return f"{module}.{name}" if module else name


class _Analysis:
    """Runs the rules over the graph, collecting atoms and records."""

    def __init__(
        self, model: nn.Module, gm: fx.GraphModule, metas: dict[fx.Node, Any], rules: Rules
    ) -> None:
        self.model, self.gm, self.metas, self.rules = model, gm, metas, rules
        self.atoms, self.records = Atoms(), Records()
        self.values: dict[fx.Node, Value] = {}
        self.dependent: set[fx.Node] = set()
        self.state = set(model.state_dict().keys())
        self.params: dict[str, TDims] = {}
        self.param_order: dict[str, int] = {}

    def run(self) -> None:
        for order, node in enumerate(self.gm.graph.nodes):
            meta = self.metas.get(node)
            if node.op == "placeholder":
                self.dependent.add(node)
                self.values[node] = self._fixed_value(meta, "network input", origin="input")
            elif node.op == "get_attr":
                self.values[node] = self._attr(node, meta, order)
            elif node.op == "output":
                for layout in _layouts(self._resolve(node.args)):
                    self.atoms.fix_layout(layout, "network output")
                    for leaf in self.atoms.leaves(layout):
                        self.atoms.origin[leaf] = "output"
            else:
                if any(a in self.dependent for a in node.all_input_nodes):
                    self.dependent.add(node)
                self.values[node] = self._apply(node, meta, order)
        self._param_members()
        self._tie_shared_axes()

    # -- node kinds ---------------------------------------------------------------------
    def _attr(self, node: fx.Node, meta: Any, order: int) -> Value:
        if not isinstance(meta, Meta):
            return None
        name = str(node.target)
        if name not in self.state:
            return self._fixed_value(meta, f"constant tensor {name}")
        if name not in self.params:
            dims = tuple(self.atoms.layout(n) for n in meta.shape)
            self.params[name] = TDims(dims, meta.shape, param=name)
            self.records.tensors.append(dims)
            self.param_order[name] = order
        return self.params[name]

    def _apply(self, node: fx.Node, meta: Any, order: int) -> Value:
        args = self._resolve(node.args)
        kwargs = self._resolve(node.kwargs)
        has_in = any(True for _ in _tensors_in((args, kwargs)))
        module = self.model.get_submodule(str(node.target)) if node.op == "call_module" else None
        if module is not None:
            rule = self.rules.module_rule(module)
        elif node.op == "call_method":
            rule = self.rules.method_rule(str(node.target))
        else:
            rule = self.rules.function_rule(node.target)
        if not has_tensor(meta):
            shape_query = (
                node.target in _SHAPE_METHODS
                or node.target in _SHAPE_FUNCS
                or isinstance(node.target, torch._ops.OpOverload)  # sym_size, asserts
            )
            if not has_in or shape_query:
                return None
            return self._unsupported(node, meta, args, kwargs, "returns a Python value")
        if rule is None:
            return self._unsupported(node, meta, args, kwargs, "")
        mark = self.records.mark()
        ctx = Ctx(
            self.atoms, self.records, node, _scope(node), module, tuple(args), dict(kwargs),
            meta, order, self.dependent,
        )  # fmt: skip
        try:
            return rule(ctx)
        except Exception as exc:  # a rule that cannot express the op: fix, never guess
            self.records.rollback(mark)
            log.debug("rule for %s failed", node.format_node(), exc_info=True)
            return self._unsupported(node, meta, args, kwargs, str(exc))

    def _unsupported(self, node: fx.Node, meta: Any, args: Any, kwargs: Any, why: str) -> Value:
        touched = _layouts((args, kwargs))
        if node.op == "call_module":
            what = f"module {type(self.model.get_submodule(str(node.target))).__name__}"
        else:
            what = f"{node.op} {_op_name(node)}"
        where = _scope(node) or "<root>"
        message = f"{where}: unsupported {what}" + (f" ({why})" if why else "")
        for layout in touched:
            self.atoms.fix_layout(layout, message)
        self.records.fixed_by.append((message, touched))
        return self._fixed_value(meta, message)

    # -- helpers ------------------------------------------------------------------------
    def _resolve(self, value: Any) -> Any:
        def one(n: fx.Node) -> Any:
            v = self.values.get(n)
            return v if v is not None else self.metas.get(n)

        return fx.node.map_arg(value, one)

    def _fixed_value(self, meta: Any, reason: str, origin: str | None = None) -> Value:
        if isinstance(meta, Meta):
            dims = tuple(self.atoms.layout(n, fixed=reason, origin=origin) for n in meta.shape)
            return TDims(dims, meta.shape)
        if isinstance(meta, tuple | list) and not isinstance(meta, torch.Size):
            return tuple(self._fixed_value(m, reason, origin) for m in meta)
        return None

    def _param_members(self) -> None:
        """Axes of parameters read directly (get_attr): producers unless contracted."""
        consumed = set(self.records.consumed)
        for name, td in self.params.items():
            for axis, layout in enumerate(td.dims):
                role = "consumer" if (name, axis) in consumed else "producer"
                self.records.members.append(
                    MemberRec(name, axis, layout, role, self.param_order[name])
                )

    def _tie_shared_axes(self) -> None:
        """One tensor axis is one set of units: tie layouts recorded for it more than once
        (a module called twice, a shared weight)."""
        first: dict[tuple[str, int, bool], Layout] = {}
        for rec in self.records.members:
            key = (rec.tensor, rec.axis, rec.per_group)
            if key not in first:
                first[key] = rec.layout
                continue
            try:
                self.atoms.union_layouts(first[key], rec.layout)
            except Exception:
                for layout in (first[key], rec.layout):
                    self.atoms.fix_layout(layout, f"{rec.tensor} is shared inconsistently")
                self.records.fixed_by.append(
                    (f"{rec.tensor}: shared tensor used with incompatible layouts",
                     [first[key], rec.layout])
                )  # fmt: skip
