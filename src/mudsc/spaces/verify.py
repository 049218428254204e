"""Random block-respecting permutations of a spec's spaces, and the numeric self-check.

The invariance property (docs/ALGORITHM.md section 2) is the test of every extraction: a
model with every non-fixed space permuted at random computes the same function.  After
tracing, a float64 copy of the model with randomised weights (so zero-initialised
tensors such as a class token still matter) is permuted and compared; any space that
changes the output is fixed and reported, so a rule error can never slip through
silently.  (An attention key bias is the one member this check cannot see.)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mudsc.spaces.spec import MergeSpec, Space

log = logging.getLogger(__name__)

_SMALL = 1 << 16  # tensors up to this size get random noise in the self-check


def random_permutations(spec: MergeSpec, generator: torch.Generator) -> dict[str, Tensor]:
    """For every non-fixed space, ``src`` with new unit ``p`` = old unit ``src[p]``.

    Blocks move as wholes (one block order per tie); units inside each block are
    permuted independently per block.
    """
    block_orders: dict[str, Tensor] = {}
    perms: dict[str, Tensor] = {}
    for s in spec.mergeable:
        g, n_blocks = s.group_size, s.groups
        if s.block_tie is not None:
            if s.block_tie not in block_orders:
                block_orders[s.block_tie] = torch.randperm(n_blocks, generator=generator)
            blocks = block_orders[s.block_tie]
        else:
            blocks = torch.randperm(n_blocks, generator=generator)
        perms[s.name] = torch.cat(
            [blocks[b] * g + torch.randperm(g, generator=generator) for b in range(n_blocks)]
        )
    return perms


def permute_state(
    state: Mapping[str, Tensor], spec: MergeSpec, perms: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Apply ``perms`` (space name -> src index) to every member of every space.

    Returns a new dict; tensors that no permuted space touches are shared, not copied.
    """
    index: dict[tuple[str, int], Tensor] = {}
    for s in spec.mergeable:
        if s.name not in perms:
            continue
        for _, m in s.members():
            if m.per_group:
                continue
            key = (m.tensor, m.axis % state[m.tensor].dim())
            idx = index.setdefault(key, torch.arange(state[m.tensor].shape[key[1]]))
            units = torch.arange(s.size * m.inner).view(s.size, m.inner)
            src = perms[s.name].view(-1, 1) * m.inner + torch.arange(m.inner)
            idx[m.start + units.flatten()] = (m.start + src.flatten()).clone()
    out = dict(state)
    for (name, axis), idx in index.items():
        out[name] = out[name].index_select(axis, idx.to(out[name].device))
    for s in spec.mergeable:
        if s.name not in perms:
            continue
        for _, m in s.members():
            if m.per_group:
                out[m.tensor] = _permute_per_group(out[m.tensor], m.axis, s, perms[s.name])
    return out


def _permute_per_group(weight: Tensor, axis: int, space: Space, src: Tensor) -> Tensor:
    """Grouped-conv input axis: rows of (new) block b read block b's in-block order."""
    g, n_blocks = space.group_size, space.groups
    rows = weight.shape[0] // n_blocks
    parts = []
    for b in range(n_blocks):
        local = src[b * g : (b + 1) * g] % g
        block = weight[b * rows : (b + 1) * rows]
        parts.append(block.index_select(axis, local.to(weight.device)))
    return torch.cat(parts, 0)


def verify_spec(
    model: nn.Module, spec: MergeSpec, inputs: tuple, tol: float = 1e-7, whole_batch: bool = False
) -> MergeSpec:
    """Permute a randomised float64 copy of ``model``; fix (and report) spaces that break it.

    The check runs on the first sample only, unless ``whole_batch`` (an exported graph
    whose batch size is fixed)."""
    if not spec.mergeable:
        return spec
    try:
        probe, x = _probe(model, inputs, whole_batch)
        touched = {m.tensor for s in spec.mergeable for _, m in s.members()}
        base = {k: v.clone() for k, v in probe.state_dict().items() if k in touched}
        with torch.no_grad():
            ref = _outputs(probe(*x))
        groups = list(_tied_groups(spec).values())
        gen = torch.Generator().manual_seed(0)
        if _agrees(probe, base, spec, groups, x, ref, gen, tol):
            return spec
        bad = [g for g in groups if not _agrees(probe, base, spec, [g], x, ref, gen, tol)]
    except Exception as exc:  # the check is a safety net; failing to run it is reported
        log.debug("spec verification failed to run", exc_info=True)
        return dataclasses.replace(
            spec, warnings=spec.warnings + (f"could not verify the spec numerically: {exc}",)
        )
    names = {n for g in (bad or groups) for n in g}
    spaces = tuple(
        dataclasses.replace(s, fixed=True, block_tie=None) if s.name in names else s
        for s in spec.spaces
    )
    message = (
        f"permuting {', '.join(sorted(names))} changed the model's output (a rule is wrong "
        f"or incomplete for this model); these spaces are fixed"
    )
    return MergeSpec(spaces, spec.warnings + (message,))


def _tied_groups(spec: MergeSpec) -> dict[str, tuple[str, ...]]:
    """Spaces that must be permuted together: a block tie, or a lone space."""
    groups: dict[str, list[str]] = {}
    for s in spec.mergeable:
        groups.setdefault(s.block_tie or f"space:{s.name}", []).append(s.name)
    return {k: tuple(v) for k, v in groups.items()}


def _probe(model: nn.Module, inputs: tuple, whole_batch: bool) -> tuple[nn.Module, tuple]:
    """A float64 eval-mode copy whose constant and small tensors are randomised.

    Constant tensors (zero biases, unit norm scales, zero class tokens, running statistics)
    would hide a missing member; large random weight matrices are left as they are.
    """
    probe = copy.deepcopy(model).double().eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, t in list(probe.state_dict(keep_vars=True).items()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen, dtype=t.dtype).to(t.device))
                continue
            std = float(t.std()) if t.numel() > 1 else 0.0
            if std > 0 and t.numel() > _SMALL:
                continue
            scale = 0.5 * std if std > 0 else 0.1
            t.add_(scale * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device))
    return probe, tuple(_one_sample(inputs, whole_batch))


def _one_sample(inputs: tuple, whole_batch: bool) -> list:
    """The first sample of a batched example input (eval mode: samples are independent)."""
    tensors = [v for v in inputs if isinstance(v, Tensor)]
    batch = {v.shape[0] if v.dim() else None for v in tensors}
    cut = len(batch) == 1 and None not in batch and not whole_batch
    out = []
    for v in inputs:
        if isinstance(v, Tensor):
            v = v.detach()[:1] if cut else v.detach()
            v = v.double() if v.is_floating_point() else v
        out.append(v)
    return out


def _outputs(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _outputs(v)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _outputs(v)]
    return []


def _agrees(
    probe: nn.Module,
    base: dict[str, Tensor],
    spec: MergeSpec,
    groups: list[tuple[str, ...]],
    x: tuple,
    ref: list[Tensor],
    gen: torch.Generator,
    tol: float,
) -> bool:
    names = {n for g in groups for n in g}
    perms = {k: v for k, v in random_permutations(spec, gen).items() if k in names}
    probe.load_state_dict(permute_state(base, spec, perms), strict=False)
    with torch.no_grad():
        out = _outputs(probe(*x))
    probe.load_state_dict(base, strict=False)
    if len(out) != len(ref):
        return False
    for a, b in zip(ref, out, strict=True):
        scale = float(a.abs().max()) if a.numel() else 0.0
        if not torch.isfinite(a).all() or scale == 0.0:
            raise ValueError("the randomised model gives a zero or non-finite output")
        if float((a - b).abs().max()) > tol * scale:
            return False
    return True
