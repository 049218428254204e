"""Last-resort taps: a space that only functional ops produce (a custom layer with raw
parameters and ``F.linear``) has no module rule to name a tap.  If such a space lies
whole on one axis of the one tensor a module (without a rule, called once) returns, that
module's output is tapped, so statistics still observe the space by a forward hook
instead of falling back to weight matching.  Candidates are checked by one run with
hooks: each module must fire once and return one tensor of the traced shape.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import Tensor, fx, nn

from mudsc.modes import eval_mode
from mudsc.spaces.atoms import Atoms
from mudsc.spaces.build import Key, places
from mudsc.spaces.context import TDims, Value
from mudsc.spaces.spec import MergeSpec, Tap


def add_module_taps(
    model: nn.Module,
    spec: MergeSpec,
    gm: fx.GraphModule,
    values: Mapping[fx.Node, Value],
    keys: Mapping[str, Key],
    atoms: Atoms,
    inputs: tuple,
) -> MergeSpec:
    """``spec`` with a module-output tap for each mergeable space that has none, where a
    module's single output carries the whole space on one axis."""
    untapped = {keys[s.name]: s.name for s in spec.mergeable if not s.taps}
    if not untapped:
        return spec
    atoms = copy.deepcopy(atoms)  # reading unplaced layouts may fix classes: keep private
    found: dict[str, tuple[Tap, tuple[int, ...]]] = {}
    for path, td in _single_outputs(gm, values).items():
        for axis, layout in enumerate(td.dims):
            free = [p for p in places(atoms, layout) if p.free]
            if len(free) == 1 and free[0].outer == 1 and free[0].key in untapped:
                p = free[0]
                tap = Tap(path, "output", axis, p.offset, p.inner)
                found.setdefault(untapped[p.key], (tap, td.shape))
    shapes = _output_shapes(model, {tap.module for tap, _ in found.values()}, inputs)
    taps = {name: tap for name, (tap, shape) in found.items() if shapes.get(tap.module) == shape}
    if not taps:
        return spec
    spaces = tuple(
        dataclasses.replace(s, taps=(taps[s.name],)) if s.name in taps else s for s in spec.spaces
    )
    return dataclasses.replace(spec, spaces=spaces)


def _single_outputs(gm: fx.GraphModule, values: Mapping[fx.Node, Value]) -> dict[str, TDims]:
    """Module paths (called once: one stack key) whose call yields one graph value."""
    outputs: dict[str, list[fx.Node]] = defaultdict(list)
    stack_keys: dict[str, set[str]] = defaultdict(set)
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for key, value in stack.items():
            path = value[0] if isinstance(value, tuple) else str(value)
            stack_keys[path].add(key)
            if any(key not in (u.meta.get("nn_module_stack") or {}) for u in node.users):
                outputs[path].append(node)
    out = {}
    for path, nodes in outputs.items():
        value = values.get(nodes[0]) if len(nodes) == 1 else None
        if path and len(stack_keys[path]) == 1 and isinstance(value, TDims):
            out[path] = value
    return out


def _output_shapes(model: nn.Module, paths: set[str], inputs: tuple) -> dict[str, tuple]:
    """The output shape of each module that fires once and returns one tensor, by one run."""
    seen: dict[str, list[object]] = defaultdict(list)
    handles = []
    for path in paths:
        module = model.get_submodule(path)
        handles.append(module.register_forward_hook(lambda m, a, out, p=path: seen[p].append(out)))
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    except Exception:  # a model the hooks cannot watch: no fallback taps
        return {}
    finally:
        for h in handles:
            h.remove()
    return {
        p: tuple(outs[0].shape)
        for p, outs in seen.items()
        if len(outs) == 1 and isinstance(outs[0], Tensor)
    }
