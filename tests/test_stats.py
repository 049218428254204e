"""stats.py: moments of tapped features against a direct float64 computation."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_apply import make
from torch import Tensor, nn

from mudsc.errors import DataError, MudscError
from mudsc.similarity import activation_similarity
from mudsc.spaces.spec import MergeSpec, Space, Tap
from mudsc.stats import CHUNK_ROWS, SpaceMoments, collect_moments, model_gram


def channels_last(x: Tensor) -> Tensor:
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def reference_features(case: str, m: nn.Module, x: Tensor) -> dict[str, list[Tensor]]:
    """Per space, per tap: the (observations, n) features, written out by hand."""
    if case == "mlp":
        h1 = m.act1(m.fc1(x))
        return {"h1": [h1], "h2": [m.act2(m.fc2(h1))]}
    if case == "convres":
        a = m.relu1(m.bn1(m.conv1(x)))
        h = m.relu2(m.bn2(m.conv2(a)))
        y = m.relu3(a + m.bn3(m.conv3(h)))
        return {"res": [channels_last(a), y.mean(dim=(2, 3))], "h": [channels_last(h)]}
    if case == "fused":
        pre = m.fused(x)
        y = m.act(pre)
        return {"a": [y[:, :4]], "b": [y[:, 4:], pre[:, 4:]]}
    if case == "flat":
        c = m.relu(m.conv(x))
        units_last = c.flatten(2).transpose(1, 2).reshape(-1, 3)  # (B*H*W, 3), fc's inner=4
        return {"c": [units_last, channels_last(c)], "f": [m.act(m.fc(c.flatten(1)))]}
    raise ValueError(case)


def spec_for(case: str) -> tuple[nn.Module, nn.Module, MergeSpec]:
    (a, spec), (b, _) = make(case, 0), make(case, 1)
    if case == "fused":  # add a projection tap: fused's pre-activation rows 4..7
        proj = Tap("fused", axis=1, project_weight="fused.weight", project_bias="fused.bias")
        proj = dataclasses.replace(proj, project_start=4)
        b_space = spec.space("b")
        spaces = (spec.space("a"), dataclasses.replace(b_space, taps=b_space.taps + (proj,)))
        spec = MergeSpec(spaces)
    return a, b, spec


def batches_for(case: str, count: int = 3, seed: int = 0) -> list[Tensor]:
    from test_apply import CASES

    g = torch.Generator().manual_seed(seed)
    return [CASES[case][0].example(g) for _ in range(count)]


def direct_moments(case: str, models: list[nn.Module], batches: list[Tensor]) -> dict:
    """Mean and covariance of the stacked features, all in float64."""
    doubles = [copy.deepcopy(m).double() for m in models]
    rows: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for x in batches:
            feats = [reference_features(case, m, x.double()) for m in doubles]
            for space, taps in feats[0].items():
                for k in range(len(taps)):
                    rows.setdefault(space, []).append(torch.cat([f[space][k] for f in feats], 1))
    out = {}
    for space, parts in rows.items():
        x = torch.cat(parts)
        mean = x.mean(0)
        out[space] = (mean, (x - mean).T @ (x - mean) / x.shape[0])
    return out


@pytest.mark.parametrize("case", ["mlp", "convres", "fused", "flat"])
def test_moments_match_a_direct_float64_computation(case: str) -> None:
    a, b, spec = spec_for(case)
    batches = batches_for(case)
    got = collect_moments([a, b], spec, batches)
    want = direct_moments(case, [a, b], batches)
    assert set(got) == set(want)
    for space, (mean, cov) in want.items():
        m = got[space]
        assert m.n_models == 2 and m.size == spec.space(space).size
        assert m.sum.dtype == torch.float64 and m.sum_outer.shape == (2 * m.size, 2 * m.size)
        assert torch.allclose(m.mean(), mean, atol=1e-5, rtol=1e-5), space
        assert torch.allclose(m.covariance(), cov, atol=1e-5, rtol=1e-5), space


def test_two_taps_add_observations() -> None:
    a, b, spec = spec_for("flat")
    batches = batches_for("flat")
    both = collect_moments([a, b], spec, batches, spaces=["c"])["c"]
    one = MergeSpec((dataclasses.replace(spec.space("c"), taps=spec.space("c").taps[:1]),))
    single = collect_moments([a, b], one, batches)["c"]
    assert both.count == 2 * single.count  # both taps observe the same values here
    assert torch.allclose(both.covariance(), single.covariance(), atol=1e-6)


def test_moments_of_two_halves_merge_into_the_whole() -> None:
    a, b, spec = spec_for("convres")
    batches = batches_for("convres", count=4)
    whole = collect_moments([a, b], spec, batches)
    first = collect_moments([a, b], spec, batches[:2])
    second = collect_moments([a, b], spec, batches[2:])
    for space, m in whole.items():
        merged = first[space].merged(second[space])
        assert merged.count == m.count
        assert torch.allclose(merged.mean(), m.mean(), atol=1e-6)
        assert torch.allclose(merged.covariance(), m.covariance(), atol=1e-6)
        recentered = first[space].recentered(torch.zeros(8, dtype=torch.float64))
        assert torch.allclose(recentered.covariance(), first[space].covariance(), atol=1e-9)
    with pytest.raises(MudscError, match="cannot merge"):
        whole["res"].merged(collect_moments([a], spec, batches)["res"])


def test_float32_products_stay_close_to_float64() -> None:
    """Features whose mean is 100x their std: the case where naive float32 sums fail."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 6)
    with torch.no_grad():
        lin.bias.fill_(100.0)
    model = nn.Sequential(lin, nn.Identity())
    spec = MergeSpec((Space("s", 6, taps=(Tap("1"),)),))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(3 * CHUNK_ROWS // 2, 4, generator=g) for _ in range(3)]
    m32 = collect_moments([model, model], spec, batches)["s"]
    m64 = collect_moments([model, model], spec, batches, dtype=torch.float64)["s"]
    with torch.no_grad():
        x = torch.cat([model(b).double() for b in batches])
    x = torch.cat([x, x], dim=1)
    exact = torch.cov(x.T, correction=0)
    scale = exact.abs().max()
    assert (m64.covariance() - exact).abs().max() <= 1e-6 * scale  # float32 features
    assert (m32.covariance() - m64.covariance()).abs().max() <= 1e-5 * scale
    assert (m32.mean() - m64.mean()).abs().max() <= 1e-6 * 100


def test_hooks_are_removed_and_modes_restored_even_on_error() -> None:
    a, b, spec = spec_for("mlp")
    a.train()
    collect_moments([a, b], spec, batches_for("mlp"))
    assert a.training and a.fc1.training and not b.training
    with pytest.raises(DataError, match="calibration batch 1 .*does not fit the model"):
        collect_moments([a, b], spec, [torch.randn(2, 6), torch.randn(2, 7)])
    for model in (a, b):
        for module in model.modules():
            assert not module._forward_hooks and not module._forward_pre_hooks
    assert a.training and a.fc2.training


def test_batches_may_be_tuples_and_models_one() -> None:
    a, b, spec = spec_for("mlp")
    batches = batches_for("mlp")
    plain = collect_moments([a, b], spec, batches)
    tuples = collect_moments([a, b], spec, [(x, torch.zeros(len(x))) for x in batches])
    assert torch.equal(plain["h2"].sum_outer, tuples["h2"].sum_outer)
    alone = collect_moments([a], spec, batches)["h1"]
    assert torch.allclose(alone.covariance(), plain["h1"].covariance()[:8, :8], atol=1e-6)


def test_user_mistakes_raise_mudsc_errors() -> None:
    a, b, spec = spec_for("mlp")
    with pytest.raises(MudscError, match="no calibration data"):
        collect_moments([a, b], spec, [])
    with pytest.raises(MudscError, match="no calibration data"):
        collect_moments([a, b], spec, iter(()))
    broken = copy.deepcopy(b)
    with torch.no_grad():
        broken.fc2.weight[0, 0] = float("nan")
    with pytest.raises(MudscError, match="'h2'"):
        collect_moments([a, broken], spec, batches_for("mlp"))
    wrong = MergeSpec((dataclasses.replace(spec.space("h1"), taps=(Tap("nowhere"),)),))
    with pytest.raises(MudscError, match="no such module"):
        collect_moments([a, b], wrong, batches_for("mlp"))
    untapped = MergeSpec((dataclasses.replace(spec.space("h1"), taps=()),))
    with pytest.raises(MudscError, match="no tap"):
        collect_moments([a, b], untapped, batches_for("mlp"))
    with pytest.raises(MudscError, match="no observations"):
        SpaceMoments(0, torch.zeros(2), torch.zeros(2, 2), 1).mean()


def test_correlation_of_duplicated_and_dead_units() -> None:
    a, b, spec = spec_for("mlp")
    with torch.no_grad():
        a.fc1.weight[1] = a.fc1.weight[0]
        a.fc1.bias[1] = a.fc1.bias[0]
        a.fc1.weight[2] = 0.0
        a.fc1.bias[2] = -1.0  # ReLU(-1) = 0: a dead unit
    moments = collect_moments([a, copy.deepcopy(a)], spec, batches_for("mlp"))["h1"]
    corr = activation_similarity(moments)
    assert not torch.isnan(corr).any()
    assert corr[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(corr[2], torch.zeros(16, dtype=torch.float64)) and torch.equal(
        corr[:, 10], torch.zeros(16, dtype=torch.float64)
    )
    live = [u for u in range(8) if u != 2 and moments.covariance()[u, u] > 0]
    assert torch.allclose(
        corr[live, [u + 8 for u in live]], torch.ones(len(live), dtype=torch.float64), atol=1e-6
    )
    assert corr.abs().max() <= 1.0


@pytest.mark.parametrize(("n_models", "width"), [(1, 6), (2, 10), (3, 12), (2, 7)])
def test_model_gram_equals_the_full_product(n_models: int, width: int) -> None:
    x = torch.randn(50, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(model_gram(x, n_models), x.T @ x, rtol=1e-12, atol=1e-12)
