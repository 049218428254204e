"""Capturing a model's graph for the analysis: by torch.fx or by torch.export.

Both routes give an ``fx.GraphModule`` whose ``call_module`` nodes name the user's
modules with a layer type and whose ``get_attr`` nodes name the model's state tensors, so
one analysis serves both.  ``route="auto"`` tries torch.fx first (fast, and its graph is
the model's own Python calls), and falls back to torch.export when fx fails or leaves a
module it has no rule for (``nn.TransformerEncoderLayer``) that export can see through.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import fx, nn

from mudsc.errors import ConfigError, SpecError
from mudsc.spaces.export import export_graph, regroup
from mudsc.spaces.rules import Rules

log = logging.getLogger(__name__)

Route = Literal["auto", "fx", "export"]
ROUTES = ("auto", "fx", "export")

HAND_SPEC = (
    "Pass a spec by hand instead: dump the spec of this model (or a similar one that "
    "traces) with `mudsc.trace(model, x).to_json()`, edit it, and call "
    "`mudsc.merge(..., spec=MergeSpec.from_json(text))`."
)


def as_module(model: Any) -> tuple[nn.Module, bool]:
    """The module to trace, and whether it is already an export graph (an
    ``ExportedProgram`` or its ``.module()``), which only the export route can read.

    ``ExportedProgram.module()`` replaces ``train``/``eval`` by methods that raise: its
    graph runs in the mode it was exported in whatever the flag says.  Those overrides
    are removed, so that the mode switches every stage makes are harmless no-ops."""
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    elif not (
        isinstance(model, fx.GraphModule)
        and any(isinstance(n.target, torch._ops.OpOverload) for n in model.graph.nodes)
    ):
        return model, False
    for name in ("train", "eval"):
        model.__dict__.pop(name, None)
    return model, True


def capture(
    model: nn.Module, inputs: tuple, rules: Rules, route: Route, exported: bool = False
) -> tuple[fx.GraphModule, str]:
    """The graph of ``model`` by ``route``; returns it with the route taken."""
    if route not in ROUTES:
        raise ConfigError(f"unknown capture route {route!r}: use one of {', '.join(ROUTES)}")
    if exported:
        if route == "fx":
            raise ConfigError("an exported program has no Python code for torch.fx: use "
                             "route='export' (or 'auto')")  # fmt: skip
        return regroup(model, model, rules), "export"
    if route == "export":
        return _export(model, inputs, rules, fx_failure=None), "export"
    try:
        gm = symbolic_trace(model, rules)
    except _FxFailure as failure:
        if route == "fx":
            raise SpecError(f"{failure}.  {_FX_FIX}  {HAND_SPEC}") from failure.__cause__
        return _export(model, inputs, rules, fx_failure=str(failure)), "export"
    opaque = [] if route == "fx" else opaque_modules(model, gm, rules)
    if not opaque:
        return gm, "fx"
    try:
        gm = _export(model, inputs, rules, fx_failure=None)
    except SpecError as exc:
        log.info("torch.export cannot see through %s either: %s", ", ".join(opaque), exc)
        return symbolic_trace(model, rules), "fx"
    log.info("traced by torch.export: torch.fx has no rule for %s", ", ".join(opaque))
    return gm, "export"


def opaque_modules(model: nn.Module, gm: fx.GraphModule, rules: Rules) -> list[str]:
    """Leaf modules of the fx graph without a rule (their spaces would all be fixed)."""
    return [
        f"{n.target} ({type(model.get_submodule(str(n.target))).__name__})"
        for n in gm.graph.nodes
        if n.op == "call_module" and rules.module_rule(model.get_submodule(str(n.target))) is None
    ]


_FX_FIX = (
    "If that is data-dependent Python control flow (an `if`/`for` on tensor values), "
    "rewrite it with tensor ops (torch.where) or register a rule for the module "
    "(mudsc.spaces.register_module_rule) so it is traced as a leaf."
)


class _FxFailure(Exception):
    """torch.fx could not trace: the message names the exception and the module."""


class _Tracer(fx.Tracer):
    """fx tracer whose leaves are standard torch.nn modules and modules with a rule."""

    def __init__(self, rules: Rules) -> None:
        super().__init__()
        self.rules = rules
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.rules.module_rule(m) is not None or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                path = self.path_of_module(m)
                self.failed_in = f"'{path or '<root>'}' ({type(m).__name__})"
            raise


def symbolic_trace(model: nn.Module, rules: Rules) -> fx.GraphModule:
    """torch.fx symbolic tracing; a failure names the exception and the innermost module."""
    tracer = _Tracer(rules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.failed_in or f"'<root>' ({type(model).__name__})"
        raise _FxFailure(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: "
            f"{first_line(exc)} (in module {where})"
        ) from exc
    return fx.GraphModule(model, graph)


def _export(
    model: nn.Module, inputs: tuple, rules: Rules, fx_failure: str | None
) -> fx.GraphModule:
    try:
        exported = export_graph(model, inputs)
    except Exception as exc:
        reason = f"torch.export cannot trace {type(model).__name__}: {type(exc).__name__}: "
        reason += first_line(exc)
        both = f"{fx_failure}; {reason}" if fx_failure else reason
        raise SpecError(f"{both}.  {_FX_FIX}  {HAND_SPEC}") from exc
    return regroup(model, exported, rules)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: errors stay one line."""
    text = str(exc).strip().splitlines()
    return text[0] if text else "(no message)"
