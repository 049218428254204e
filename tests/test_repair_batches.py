"""Renormalisation leaves a perfect merge unchanged, whatever the number of calibration batches.

A model merged with a permuted copy of itself is the model.  REPAIR used to correct every
batch toward the pooled targets during its one pass, which erased each batch's own deviation
from the pool and moved such a merge by up to 7% with 2-8 batches; it now corrects batch b
toward the sources' statistics on batch b.  The BatchNorm reset (a cumulative average of the
batch statistics) was exact already and is checked alongside.
"""

from __future__ import annotations

import copy

import pytest
import torch
from invariance import randomise_
from torch import Tensor, nn

from mudsc.merge import MergeConfig, merge_models
from mudsc.models import create
from mudsc.renorm import apply_repair, repair_layers, reset_batchnorm
from mudsc.spaces import MergeSpec, permute_state, random_permutations, trace

BATCH_COUNTS = (1, 2, 4, 8)
ZOO = {
    "mlp": {"width": 0.03},
    "resnet20-gn": {"width": 1, "groups": 2},
    "resnet20": {"width": 1},
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(1)
    model = create(name, in_channels=1, image_size=8, embed_dim=6, **ZOO[name]).double()
    return randomise_(model, torch.Generator().manual_seed(1)).eval()


def _data(count: int) -> tuple[list[Tensor], Tensor]:
    """``count`` calibration batches of uneven sizes (the last is smaller) and a test input."""
    gen = torch.Generator().manual_seed(10)
    sizes = [16] * (count - 1) + [11]
    batches = [torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64) for n in sizes]
    return batches, torch.randn(20, 1, 8, 8, generator=gen, dtype=torch.float64)


def _pair(name: str) -> tuple[nn.Module, nn.Module, MergeSpec]:
    """A model, a copy of it with every mergeable space permuted, and its spec."""
    model = _model(name)
    spec = trace(model, _data(1)[0][0][:2])
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state(model.state_dict(), spec, perms))
    return model, other, spec


@torch.no_grad()
def _rel_err(model: nn.Module, ref: nn.Module, x: Tensor) -> float:
    want = ref.eval()(x)
    return float((model.eval()(x) - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("count", BATCH_COUNTS)
@pytest.mark.parametrize("name", ["mlp", "resnet20-gn", "resnet20"])
def test_repair_leaves_a_perfect_merge_unchanged(name: str, count: int) -> None:
    model, other, spec = _pair(name)
    batches, x = _data(count)
    merged = merge_models(
        [model, other], batches, MergeConfig("act-align", repair="none"), spec=spec
    )
    assert _rel_err(merged.model, model, x) <= 1e-12  # the matching recovered the model

    assert apply_repair(merged.model, [model, other], spec, merged.matches, batches, "cpu") > 0
    assert _rel_err(merged.model, model, x) <= 1e-9


@pytest.mark.parametrize("count", [1, 4])
def test_merge_in_repair_mode_returns_a_permuted_copy_unchanged(count: int) -> None:
    model, other, spec = _pair("resnet20-gn")
    batches, x = _data(count)
    merged = merge_models([model, other], batches, MergeConfig("zipit", repair="repair"), spec=spec)
    assert _rel_err(merged.model, model, x) <= 1e-9


@pytest.mark.parametrize("count", BATCH_COUNTS)
def test_batchnorm_reset_of_a_perfect_merge_is_the_source_reset(count: int) -> None:
    """Train-mode batch statistics of the merged model are the source's, batch by batch,
    so the cumulative average over any number of batches is the source's reset."""
    model, other, spec = _pair("resnet20")
    batches, x = _data(count)
    merged = merge_models([model, other], batches, MergeConfig("act-align", repair="bn"), spec=spec)
    ref = copy.deepcopy(model)
    reset_batchnorm(ref, batches, "cpu")
    assert _rel_err(model, ref, x) > 1e-3  # the reset matters: the check below can fail
    assert _rel_err(merged.model, ref, x) <= 1e-9


def test_repair_asked_for_on_a_batchnorm_network_corrects_its_batchnorms() -> None:
    """A BatchNorm network is BN-reset by default; REPAIR, when asked for, folds into the
    BatchNorms (eval mode: a per-channel affine map), else it would find only the head."""
    model, _, spec = _pair("resnet20")
    layers = repair_layers(model, spec)
    norms = [n for n in layers if isinstance(dict(model.named_modules())[n], nn.BatchNorm2d)]
    assert "bn1" in norms and len(norms) >= 19  # the stem, two per block, the shortcuts
