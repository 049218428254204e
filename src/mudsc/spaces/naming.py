"""Stable, readable space names derived from module paths.

The rule, first match wins:

1. a space touching the network input or output: ``input`` / ``output``;
2. a name given by a rule (``nn.MultiheadAttention`` at ``p``: ``p.qk`` and ``p.v``);
3. a head-grouped space tied with another (attention after a reshape into heads):
   ``<parent>.qk`` if nothing consumes it, else ``<parent>.v``; ``<parent>`` is the
   module holding the producing projection(s) (``blocks.3.attn`` for ``blocks.3.attn.qkv``);
4. a space joined by residual additions: the common module prefix of the places where
   the additions happen, plus ``.res`` (``layer2.res``; ``res`` if there is no prefix);
5. otherwise the module of its first producer (``layer1.0.conv1``, ``blocks.3.mlp.fc1``),
   or of its first consumer plus ``.in``.

Clashes get ``.2``, ``.3``... in graph order.  Block ties are named after their module
(``blocks.3.attn.heads``, ``features.4.groups``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpaceFacts:
    key: tuple[int, ...]
    fixed: bool
    origin: str | None
    producers: list[str]
    consumers: list[str]
    hint: str | None
    residual_scopes: list[str]
    head_pair: bool
    tie: tuple[int, ...] | None


def space_names(facts: list[SpaceFacts]) -> list[str]:
    """One unique name per space, in the given (graph) order."""
    names: list[str] = []
    used: set[str] = set()
    for f in facts:
        base = _base(f)
        name, i = base, 2
        while name in used:
            name, i = f"{base}.{i}", i + 1
        used.add(name)
        names.append(name)
    return names


def block_tie_name(names: list[str], facts: list[SpaceFacts], root: tuple[int, ...]) -> str:
    """Name of a head-order tie: the attention module of its first space, plus ``.heads``."""
    first = next(n for n, f in zip(names, facts, strict=True) if f.tie == root)
    return f"{first.rsplit('.', 1)[0]}.heads" if "." in first else "heads"


def _base(f: SpaceFacts) -> str:
    if f.origin in ("input", "output"):
        return f.origin
    if f.hint:
        return f.hint
    if f.head_pair and f.producers:
        parent = _parent(f.producers)
        suffix = "v" if f.consumers else "qk"
        return f"{parent}.{suffix}" if parent else suffix
    if f.residual_scopes and not f.fixed:
        prefix = _common(f.residual_scopes)
        return f"{prefix}.res" if prefix else "res"
    if f.producers:
        return _module(f.producers[0])
    if f.consumers:
        return _module(f.consumers[0]) + ".in"
    return "space"


def _module(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0] if "." in tensor else tensor


def _parent(tensors: list[str]) -> str:
    modules = sorted({_module(t) for t in tensors})
    if len(modules) == 1:
        return _module(modules[0]) if "." in modules[0] else ""
    return _common(modules)


def _common(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)
