"""The export capture route: a model's graph by non-strict ``torch.export``.

``torch.export`` sees through Python control flow that torch.fx symbolic tracing cannot
(Hugging Face models, ``nn.TransformerEncoder``), but records ATen ops all the way down.
To keep one analysis for both routes, the ATen nodes that run inside a module with a
layer type (a module rule) are folded back into one ``call_module`` node of the user's
module: module rules, member names and taps (module inputs and outputs, observed by
hooks at statistics time) are then those of the fx route.  Everything else stays an ATen
call, analysed by the ATen rules (:mod:`mudsc.spaces.aten`).  Parameters keep the
model's own state-dict names (``ExportedProgram.module()`` reads them with ``get_attr``).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

import mudsc.spaces.aten  # noqa: F401  (registers the ATen rules)
from mudsc.modes import eval_mode
from mudsc.spaces.rules import Rules


def export_graph(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    """The graph of ``model`` on ``inputs`` by non-strict ``torch.export``, in eval mode.

    torch logs the partial graph of a failed export as a warning; the failure is reported
    in the error instead, so that log is silenced here."""
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    try:
        with eval_mode(model):
            program = torch.export.export(model, tuple(inputs), strict=False)
    finally:
        shapes_log.setLevel(level)
    return program.module()


def regroup(model: nn.Module, exported: fx.GraphModule, rules: Rules) -> fx.GraphModule:
    """The export graph with each call of a ruled module folded into one ``call_module``.

    The result's root holds the user's own submodules (by path) and the export's tensors
    (by their state-dict names), so its nodes name what the user's model names.
    """
    return _Regrouper(model, exported, rules).run()


@dataclass
class _Group:
    """The nodes of one call of a ruled module (one nn_module_stack key)."""

    path: str
    nodes: list[fx.Node] = field(default_factory=list)


class _Regrouper:
    def __init__(self, model: nn.Module, exported: fx.GraphModule, rules: Rules) -> None:
        self.model, self.exported, self.rules = model, exported, rules
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.root: dict[str, Any] = {}
        self._ruled: dict[str, bool] = {}

    def run(self) -> fx.GraphModule:
        nodes = [n for n in self.exported.graph.nodes if not _is_guard(n)]
        for group in self._groups(nodes):
            if isinstance(group, _Group):
                self._fold(group)
            else:
                self._copy(group)
        return fx.GraphModule(self.root, self.graph, class_name=type(self.model).__name__)

    # -- grouping -----------------------------------------------------------------------
    def _groups(self, nodes: list[fx.Node]) -> Iterable[fx.Node | _Group]:
        """Nodes in order; consecutive nodes of one ruled module call as one group."""
        current: tuple[str, _Group] | None = None
        for n in nodes:
            leaf = self._leaf(n) if n.op == "call_function" else None
            if leaf is None:
                if current is not None:
                    yield current[1]
                    current = None
                if n.op != "get_attr":  # get_attr nodes are emitted at their first use
                    yield n
                continue
            key, path = leaf
            if current is None or current[0] != key:
                if current is not None:
                    yield current[1]
                current = (key, _Group(path))
            current[1].nodes.append(n)
        if current is not None:
            yield current[1]

    def _leaf(self, node: fx.Node) -> tuple[str, str] | None:
        """The outermost module with a rule that ``node`` runs in: (stack key, path)."""
        for key, value in (node.meta.get("nn_module_stack") or {}).items():
            path = value[0] if isinstance(value, tuple) else str(value)
            if self._is_ruled(path):
                return key, path
        return None

    def _is_ruled(self, path: str) -> bool:
        if path not in self._ruled:
            try:
                module = self.model.get_submodule(path) if path else self.model
            except AttributeError:
                module = None
            self._ruled[path] = (
                module is not None and bool(path) and self.rules.module_rule(module) is not None
            )
        return self._ruled[path]

    # -- emitting -----------------------------------------------------------------------
    def _copy(self, node: fx.Node) -> None:
        for arg in node.all_input_nodes:
            self._ensure(arg)
        if node.op == "output" and self._single_output():
            (result,) = node.args[0]  # return the tensor itself, as the model does
            self.env[node] = self.graph.output(self.env[result])
            return
        self.env[node] = self.graph.node_copy(node, lambda a: self.env[a])

    def _single_output(self) -> bool:
        """Whether the model returns one tensor (the export graph returns a flat tuple)."""
        info = getattr(self.exported.graph._codegen, "pytree_info", None)
        return info is not None and info.out_spec is not None and info.out_spec.is_leaf()

    def _ensure(self, node: fx.Node) -> None:
        """Emit a get_attr right before its first use (the order fx would give it)."""
        if node in self.env or node.op != "get_attr":
            return
        name = str(node.target)
        try:  # the user's own tensor when it has one: the root never replaces it
            self.root[name] = _attr(self.model, name)
        except AttributeError:  # a constant the export lifted
            self.root[name] = _attr(self.exported, name)
        self.env[node] = self.graph.get_attr(name)
        self.env[node].meta = dict(node.meta)

    def _fold(self, group: _Group) -> None:
        """One call_module for the group if it reads one activation and yields one value;
        otherwise its ATen nodes are kept (analysed by the ATen rules)."""
        members = set(group.nodes)
        own = self._own_tensors(group.path)
        inputs = list(
            dict.fromkeys(
                a for n in group.nodes for a in n.all_input_nodes
                if a not in members and not (a.op == "get_attr" and self._reads(a, own))
            )
        )  # fmt: skip
        outputs = [n for n in group.nodes if any(u not in members for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            for n in group.nodes:
                self._copy(n)
            return
        self._ensure(inputs[0])
        module = self.model.get_submodule(group.path)
        self.root[group.path] = module
        x = self.env[inputs[0]]
        if isinstance(module, nn.MultiheadAttention):  # self-attention: query = key = value
            call = self.graph.call_module(group.path, (x, x, x), {"need_weights": False})
            result = self.graph.call_function(operator.getitem, (call, 0))
        else:
            call = result = self.graph.call_module(group.path, (x,))
        for n in {call, result}:
            n.meta["nn_module_stack"] = dict(outputs[0].meta.get("nn_module_stack") or {})
        self.env[outputs[0]] = result

    def _own_tensors(self, path: str) -> set[int]:
        module = self.model.get_submodule(path)
        return {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}

    def _reads(self, node: fx.Node, own: set[int]) -> bool:
        """Whether a get_attr reads one of ``own``: by identity, as a tied weight (GPT-2's
        lm_head and wte) is exported under one of its names only."""
        try:
            return id(_attr(self.exported, str(node.target))) in own
        except AttributeError:
            return False


def _is_guard(node: fx.Node) -> bool:
    """The input guards ``ExportedProgram.module()`` adds: not part of the computation."""
    return node.op == "call_module" and str(node.target).startswith("_guards")


def _attr(root: nn.Module, name: str) -> Any:
    value: Any = root
    for part in name.split("."):
        value = getattr(value, part)
    return value
