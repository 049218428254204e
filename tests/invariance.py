"""Invariance helpers shared by the spec and merge-engine tests.

A correct spec satisfies the invariance property: permuting every non-fixed space at
random (whole blocks where grouped, one block order per tie, units inside each block
independently) leaves the model's outputs unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from mudsc.spaces import MergeSpec, permute_state, random_permutations


def randomise_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random weights and BN running statistics, so that zero-initialised tensors matter."""
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=generator, dtype=t.dtype).to(t.device))
            else:
                t.add_(0.2 * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device))
    return model


def permute_model(
    model: nn.Module, spec: MergeSpec, generator: torch.Generator
) -> dict[str, Tensor]:
    """State dict of ``model`` with every non-fixed space of ``spec`` randomly permuted."""
    return permute_state(model.state_dict(), spec, random_permutations(spec, generator))


def assert_invariant(
    model: nn.Module,
    spec: MergeSpec,
    x: Tensor | tuple,
    *,
    generator: torch.Generator | None = None,
    rtol: float = 1e-5,
) -> None:
    """Outputs of ``model`` and a randomly permuted copy agree (same mode, same batch)."""
    generator = generator or torch.Generator().manual_seed(0)
    inputs = x if isinstance(x, tuple) else (x,)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permute_model(model, spec, generator))
    with torch.no_grad():
        refs, outs = _tensors(model(*inputs)), _tensors(permuted(*inputs))
    assert refs and len(refs) == len(outs)
    for ref, out in zip(refs, outs, strict=True):
        scale = ref.abs().max().clamp_min(1e-12)
        err = float((ref - out).abs().max() / scale)
        assert err <= rtol, f"permuted model differs: relative error {err:.3g} > {rtol}"


def _tensors(value: object) -> list[Tensor]:
    """The floating-point tensors of a model's output (a tensor, a tuple, a dict or a
    Hugging Face ModelOutput)."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []
