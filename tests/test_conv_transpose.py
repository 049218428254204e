"""Transposed convolutions (module and functional, plain, grouped, depthwise) on both
capture routes: the spaces an expert expects, and permuted copies merged back exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from archs import FunctionalConvs, Upsampler
from invariance import randomise_

from mudsc.layers import has_batchnorm
from mudsc.merge import MergeConfig, merge_models
from mudsc.methods import METHODS
from mudsc.renorm import reset_batchnorm
from mudsc.spaces import permute_state, random_permutations, trace

NOT_AVG = [m for m in METHODS if m != "avg"]


def _model(cls: type) -> torch.nn.Module:
    torch.manual_seed(1)
    return randomise_(cls().double(), torch.Generator().manual_seed(1)).eval()


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100)
    return [torch.randn(16, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("route", ["fx", "export"])
def test_transposed_convolution_spaces(route: str) -> None:
    spec = trace(_model(Upsampler), _batches()[0][:2], route=route)
    assert not spec.warnings
    up, grouped = spec.space("up"), spec.space("grouped")
    assert (up.size, up.groups, grouped.size, grouped.groups) == (12, 4, 8, 4)
    assert ("up.weight", 1) in {(m.tensor, m.axis) for m in up.producers}
    assert ("grouped.weight", 0) in {(m.tensor, m.axis) for m in up.consumers}
    assert ("bn.weight", 0) in {(m.tensor, m.axis) for m in up.producers}
    # the depthwise layer filters the grouped layer's channels in place
    assert ("depthwise.weight", 0) in {(m.tensor, m.axis) for m in grouped.producers}


@pytest.mark.parametrize("route", ["fx", "export"])
def test_functional_transposed_convolution_spaces(route: str) -> None:
    spec = trace(_model(FunctionalConvs), _batches()[0][:2], route=route)
    assert not spec.warnings
    sizes = {s.size for s in spec.mergeable}
    assert sizes == {8, 6, 7}  # stem, the transposed conv's output (depthwise in place), mix


@pytest.mark.parametrize("repair", ["auto", "none"])
@pytest.mark.parametrize("method", NOT_AVG)
@pytest.mark.parametrize("cls", [Upsampler, FunctionalConvs])
def test_permuted_copy_is_recovered(cls: type, method: str, repair: str) -> None:
    model, batches = _model(cls), _batches()
    spec = trace(model, batches[0][:2])
    perms = random_permutations(spec, torch.Generator().manual_seed(7))
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state(model.state_dict(), spec, perms))
    config = MergeConfig(method, repair=repair, patience=1)
    result = merge_models([model, other], batches[:1], config, spec=spec)
    for space in spec.mergeable:
        match = result.matches[space.name]
        together = match.unmerge_of(1) @ match.unmerge_of(0).T
        want = torch.nn.functional.one_hot(perms[space.name], space.size).double()
        assert torch.equal(together, want), space.name
    ref = copy.deepcopy(model)  # BN reset of the recovered model = BN reset of the original
    if repair == "auto" and has_batchnorm(ref):
        reset_batchnorm(ref, batches[:1], "cpu")
    with torch.no_grad():
        want = ref.eval()(batches[0])
        err = (result.model.eval()(batches[0]) - want).abs().max() / want.abs().max()
    assert err < 1e-6
