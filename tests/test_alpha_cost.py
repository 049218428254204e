"""alpha='auto' repairs each grid point's candidate on a few calibration batches only, then
repairs the winner on all of them: the result is the single-alpha merge at the chosen alpha,
and the forward passes per grid point are alpha_repair_batches, not every batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from invariance import randomise_
from torch import Tensor, nn

import mudsc.merge as merge_module
from mudsc.errors import ConfigError
from mudsc.merge import MergeConfig, MergeResult, merge_models
from mudsc.models import create
from mudsc.stages import split_holdout

GRID = (0.2, 0.5, 0.8)
ZOO = {"resnet20": {"width": 1}, "mlp": {"width": 0.03}}  # BatchNorm reset; REPAIR


def _models(name: str) -> list[nn.Module]:
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = create(name, in_channels=1, image_size=8, embed_dim=6, **ZOO[name]).double()
        models.append(randomise_(model, torch.Generator().manual_seed(seed)).eval())
    return models


def _batches(count: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(12, 1, 8, 8, generator=gen, dtype=torch.float64) for _ in range(count)]


def _config(**kw: object) -> MergeConfig:
    return MergeConfig("mudsc-align", patience=1, max_sweeps=2, **kw)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_auto_returns_the_single_alpha_merge(name: str) -> None:
    models, batches = _models(name), _batches(5)
    auto = merge_models(models, batches, _config(alpha="auto", alpha_grid=GRID))
    fit, _ = split_holdout(batches, auto.config.holdout)
    assert auto.calibration_batches == len(fit) == 4
    single = merge_models(models, fit, _config(alpha=auto.alpha))
    assert _same_state(auto.model, single.model)


def _scored(name: str, batches: Sequence[Tensor], **kw: object) -> tuple[MergeResult, list]:
    """alpha='auto' with a user score that picks alpha 0.5; the candidates it saw."""
    seen: list[MergeResult] = []
    scores = dict(zip(GRID, (0.3, 0.9, 0.1), strict=True))

    def score(candidate: MergeResult) -> float:
        seen.append(candidate)
        return scores[candidate.alpha]

    cfg = _config(alpha="auto", alpha_grid=GRID, **kw)
    return merge_models(_models(name), batches, cfg, score_fn=score), seen


@pytest.mark.parametrize("name", sorted(ZOO))
def test_the_winner_is_repaired_again_on_every_batch(name: str) -> None:
    batches = _batches(3)
    result, seen = _scored(name, batches)
    assert result.alpha == 0.5 and len(seen) == len(GRID)
    assert not _same_state(result.model, seen[1].model)  # the trial saw one batch only
    single = merge_models(_models(name), batches, _config(alpha=0.5))
    assert _same_state(result.model, single.model)


@pytest.mark.parametrize("k", [0, 3, 10])
def test_a_trial_on_every_batch_is_kept(k: int) -> None:
    result, seen = _scored("resnet20", _batches(3), alpha_repair_batches=k)
    assert result.model is seen[1].model


def _count_repairs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Per repair call: forward passes of the merged model, and of each source."""
    calls: list[tuple[int, int]] = []
    real: Callable[..., None] = merge_module.repair_stage

    def counting(merged: nn.Module, sources: Sequence[nn.Module], *args: object) -> None:
        counts = [0] * (1 + len(sources))
        handles = [
            m.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
            for i, m in enumerate([merged, *sources])
        ]
        try:
            real(merged, sources, *args)
        finally:
            for h in handles:
                h.remove()
        assert len(set(counts[1:])) == 1  # every source ran alike
        calls.append((counts[0], counts[1]))

    monkeypatch.setattr(merge_module, "repair_stage", counting)
    return calls


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize(("name", "source_passes"), [("resnet20", 0), ("mlp", 1)])
def test_each_grid_point_runs_k_batches(
    monkeypatch: pytest.MonkeyPatch, name: str, source_passes: int, k: int
) -> None:
    """BatchNorm reset: k forwards of the candidate; REPAIR: k of it and of each source.
    The winner then runs every fit batch once."""
    calls = _count_repairs(monkeypatch)
    cfg = _config(alpha="auto", alpha_grid=GRID, alpha_repair_batches=k)
    result = merge_models(_models(name), _batches(6), cfg)
    fit = result.calibration_batches
    assert fit == 5
    per_point = [(k, source_passes * k)] * len(GRID)
    assert calls == per_point + [(fit, source_passes * fit)]


def test_all_batches_and_a_single_alpha_repair_once_on_every_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_repairs(monkeypatch)
    cfg = _config(alpha="auto", alpha_grid=GRID, alpha_repair_batches=0)
    assert merge_models(_models("resnet20"), _batches(6), cfg).calibration_batches == 5
    assert calls == [(5, 0)] * len(GRID)
    calls.clear()
    merge_models(_models("resnet20"), _batches(6), _config(alpha=0.5))
    assert calls == [(6, 0)]


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_alpha_repair_batches_is_a_count(value: object) -> None:
    with pytest.raises(ConfigError, match=r"alpha_repair_batches must be an integer >= 0"):
        MergeConfig(alpha_repair_batches=value)  # type: ignore[arg-type]
