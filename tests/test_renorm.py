"""Normalisation statistics after merging (docs/ALGORITHM.md section 7): REPAIR hits its targets,
BatchNorm reset equals one cumulative pass, repair="none" changes nothing, mode choice."""

from __future__ import annotations

import copy

import pytest
import torch
from invariance import randomise_
from torch import Tensor, nn

from mudsc.apply import apply_matches
from mudsc.errors import MudscError
from mudsc.merge import MergeConfig, merge_models
from mudsc.models import create
from mudsc.renorm import apply_repair, repair_layers, reset_batchnorm, resolve_mode
from mudsc.spaces import MergeSpec, trace

# Tiny float64 configurations: (arguments, image size).
ZOO = {
    "mlp": ({"width": 0.03}, 8),
    "resnet20-gn": ({"width": 1, "groups": 2}, 8),
    "vit": ({"width": 0.25, "depth": 2, "patch_size": 4}, 8),
    "vgg11-bn": ({"width": 0.0625}, 8),
}


def _model(name: str, seed: int) -> nn.Module:
    kwargs, size = ZOO[name]
    torch.manual_seed(seed)
    model = create(name, in_channels=1, image_size=size, embed_dim=6, **kwargs).double()
    return randomise_(model, torch.Generator().manual_seed(seed)).eval()


def _batches(name: str, count: int, size: int = 16) -> list[Tensor]:
    side = ZOO[name][1]
    gen = torch.Generator().manual_seed(10)
    return [
        torch.randn(size, 1, side, side, generator=gen, dtype=torch.float64) for _ in range(count)
    ]


def _pair(name: str) -> tuple[list[nn.Module], MergeSpec]:
    models = [_model(name, 1), _model(name, 2)]
    return models, trace(models[0], _batches(name, 1)[0][:2])


@torch.no_grad()
def _layer_stats(
    model: nn.Module, layers: list[str], batches: list[Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel mean and (population) std of each layer's output over all batches."""
    outs: dict[str, list[Tensor]] = {name: [] for name in layers}
    handles = []
    for name in layers:
        module = model.get_submodule(name)
        axis = -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1
        handles.append(
            module.register_forward_hook(
                lambda _m, _i, out, name=name, axis=axis: outs[name].append(
                    out.movedim(axis, -1).reshape(-1, out.shape[axis])
                )
            )
        )
    model.eval()
    for x in batches:
        model(x)
    for h in handles:
        h.remove()
    stats = {}
    for name, parts in outs.items():
        y = torch.cat(parts)
        stats[name] = (y.mean(0), y.std(0, unbiased=False))
    return stats


def _targets(sources, layers, batches, matches, slices):
    """Per merged channel, the M-weighted average of the source units' means and stds."""
    per_source = [_layer_stats(s, layers, batches) for s in sources]
    targets = {}
    for name in layers:
        mean = torch.zeros_like(per_source[0][name][0])
        std = torch.zeros_like(mean)
        for space, start, size in slices[name]:
            for i, stats in enumerate(per_source):
                m_i = matches[space].merge_of(i)
                mean[start : start + size] += stats[name][0][start : start + size] @ m_i
                std[start : start + size] += stats[name][1][start : start + size] @ m_i
        targets[name] = (mean, std)
    return targets


def _worst(stats, targets) -> float:
    """Largest deviation of a mean or std from its target, relative to the target std."""
    worst = 0.0
    for name, (t_mean, t_std) in targets.items():
        mean, std = stats[name]
        scale = t_std.clamp_min(1e-3)
        worst = max(worst, float(((mean - t_mean) / scale).abs().max()))
        worst = max(worst, float(((std - t_std) / scale).abs().max()))
    return worst


# -- REPAIR ---------------------------------------------------------------------------------

EXPECTED_LAYERS = {
    "mlp": {"features.0", "features.2", "features.4"},  # not the fixed output layer
    "resnet20-gn": None,  # every GroupNorm (the convolutions have no bias)
    "vit": None,  # patch embedding, every LayerNorm and Linear but the head
}


def _expected_layers(name: str, model: nn.Module) -> set[str]:
    if EXPECTED_LAYERS[name] is not None:
        return EXPECTED_LAYERS[name]
    kinds = (nn.GroupNorm,) if name == "resnet20-gn" else (nn.LayerNorm, nn.Linear, nn.Conv2d)
    return {n for n, m in model.named_modules() if isinstance(m, kinds) and n != "head"}


@pytest.mark.parametrize("method", ["avg", "zipit"])
@pytest.mark.parametrize("name", ["mlp", "resnet20-gn", "vit"])
def test_repair_hits_the_source_statistics(name: str, method: str) -> None:
    """On one calibration batch REPAIR is exact: every corrected layer's per-channel mean
    and std equal the M-weighted average of the merged source units' statistics."""
    sources, spec = _pair(name)
    data = _batches(name, 1)
    cfg = MergeConfig(method=method, repair="none")
    result = merge_models(sources, data, cfg, spec=spec)
    merged = result.model
    slices = repair_layers(merged, spec)
    layers = sorted(slices)
    assert set(layers) == _expected_layers(name, merged)
    targets = _targets(sources, layers, data, result.matches, slices)
    before = _worst(_layer_stats(merged, layers, data), targets)

    assert apply_repair(merged, sources, spec, result.matches, data, "cpu") == len(layers)
    after = _worst(_layer_stats(merged, layers, data), targets)
    assert before > 0.05  # merging moved the statistics: the check below can fail
    assert after < 1e-6


def test_repair_over_several_batches_approaches_the_targets() -> None:
    """With several batches each batch is standardised with its own statistics during
    the pass (BatchNorm-style), so the folded result is close to the targets, not exact."""
    sources, spec = _pair("resnet20-gn")
    data = _batches("resnet20-gn", 3)
    result = merge_models(sources, data, MergeConfig("avg", repair="none"), spec=spec)
    slices = repair_layers(result.model, spec)
    layers = sorted(slices)
    targets = _targets(sources, layers, data, result.matches, slices)
    before = _worst(_layer_stats(result.model, layers, data), targets)
    apply_repair(result.model, sources, spec, result.matches, data, "cpu")
    after = _worst(_layer_stats(result.model, layers, data), targets)
    assert after < 0.25 * before


def test_merge_with_repair_mode_applies_repair() -> None:
    sources, spec = _pair("mlp")
    data = _batches("mlp", 1)
    merged = merge_models(sources, data, MergeConfig("avg", repair="repair"), spec=spec).model
    raw = merge_models(sources, data, MergeConfig("avg", repair="none"), spec=spec)
    apply_repair(raw.model, sources, spec, raw.matches, data, "cpu")
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, raw.model.state_dict()[key], rtol=1e-12, atol=1e-12)


def test_repair_needs_data() -> None:
    sources, spec = _pair("mlp")
    raw = merge_models(sources, _batches("mlp", 1), MergeConfig("avg", repair="none"), spec=spec)
    before = copy.deepcopy(raw.model.state_dict())
    with pytest.raises(MudscError, match="calibration data"):
        apply_repair(raw.model, sources, spec, raw.matches, [], "cpu")
    assert all(torch.equal(v, before[k]) for k, v in raw.model.state_dict().items())


# -- BatchNorm reset ------------------------------------------------------------------------


@torch.no_grad()
def _manual_bn_stats(model: nn.Module, batches: list[Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Average over batches of each BatchNorm input's batch mean and unbiased variance, in
    a train-mode pass (what a cumulative running average of one pass holds)."""
    probe = copy.deepcopy(model).train()
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for name, module in probe.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            seen[name] = []
            module.register_forward_pre_hook(
                lambda _m, args, name=name: seen[name].append(
                    (args[0].mean((0, 2, 3)), args[0].var((0, 2, 3), unbiased=True))
                )
            )
    for x in batches:
        probe(x)
    return {
        name: (torch.stack([m for m, _ in v]).mean(0), torch.stack([s for _, s in v]).mean(0))
        for name, v in seen.items()
    }


def test_batchnorm_reset_is_one_cumulative_pass() -> None:
    model = _model("vgg11-bn", 1)
    data = _batches("vgg11-bn", 3, size=8)
    want = _manual_bn_stats(model, data)
    reset_batchnorm(model, data, "cpu")
    assert not model.training
    for name, (mean, var) in want.items():
        bn = model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-12)
        assert int(bn.num_batches_tracked) == len(data)
        assert bn.momentum == 0.1  # restored


def test_merge_resets_batchnorm_on_the_calibration_data() -> None:
    sources, spec = _pair("vgg11-bn")
    data = _batches("vgg11-bn", 3, size=8)
    merged = merge_models(sources, data, MergeConfig("zipit"), spec=spec).model
    raw = merge_models(sources, data, MergeConfig("zipit", repair="none"), spec=spec).model
    want = _manual_bn_stats(raw, data)
    for name, (mean, var) in want.items():
        bn = merged.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-12)


def test_batchnorm_reset_without_data_keeps_the_statistics() -> None:
    model = _model("vgg11-bn", 1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(MudscError, match="calibration data"):
        reset_batchnorm(model, iter([]), "cpu")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- repair="none", sources untouched, mode choice ----------------------------------------------


@pytest.mark.parametrize("name", ["vgg11-bn", "resnet20-gn"])
def test_repair_none_changes_nothing(name: str) -> None:
    sources, spec = _pair(name)
    data = _batches(name, 2, size=8)
    result = merge_models(sources, data, MergeConfig("zipit", repair="none"), spec=spec)
    want = apply_matches(spec, [s.state_dict() for s in sources], result.matches)
    got = result.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("mode", ["auto", "bn", "repair"])
@pytest.mark.parametrize("name", ["vgg11-bn", "vit"])
def test_merging_never_changes_the_sources(name: str, mode: str) -> None:
    sources, spec = _pair(name)
    before = [copy.deepcopy(s.state_dict()) for s in sources]
    merge_models(sources, _batches(name, 2, size=8), MergeConfig("zipit", repair=mode), spec=spec)
    for s, state in zip(sources, before, strict=True):
        assert all(torch.equal(v, state[k]) for k, v in s.state_dict().items())


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("vgg11-bn", "bn"), ("resnet20", "bn"), ("resnet50", "bn"),
        ("mlp", "repair"), ("vgg11", "repair"), ("resnet20-gn", "repair"), ("vit", "repair"),
    ],
)  # fmt: skip
def test_auto_mode_picks_bn_reset_for_batchnorm_models(name: str, mode: str) -> None:
    width = {"resnet20": 1, "resnet20-gn": 1}.get(name, 0.0625)
    model = create(name, in_channels=1, image_size=8, embed_dim=6, width=width)
    assert resolve_mode("auto", model) == mode
    for explicit in ("bn", "repair", "none"):
        assert resolve_mode(explicit, model) == explicit


def test_unknown_repair_mode() -> None:
    model = create("mlp", in_channels=1, image_size=8, embed_dim=6, width=0.03)
    with pytest.raises(MudscError, match="valid: auto, bn, repair, none"):
        resolve_mode("batchnorm", model)
    with pytest.raises(MudscError, match="unknown repair 'batchnorm'"):
        MergeConfig(repair="batchnorm")
