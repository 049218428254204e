"""similarity.py: activation, weight (rebased) and dual similarities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_apply import (
    CASES,
    make,
    moving_perms,
    permute_state,
    random_zip_match,
    true_matches,
)

from mudsc.errors import MudscError
from mudsc.similarity import (
    WeightSimilarity,
    activation_similarity,
    dead_units,
    dual_similarity,
    weight_similarity,
    with_dead_ties,
)
from mudsc.stats import collect_moments


@pytest.mark.parametrize("case", sorted(CASES))
def test_weight_similarity_finds_a_permuted_copy(case: str) -> None:
    model, spec = make(case)
    state = model.state_dict()
    perms = moving_perms(spec)
    states = [state, permute_state(spec, state, perms)]
    matches = true_matches(perms)
    for space in spec.mergeable:
        n = space.size
        s = weight_similarity(spec, space.name, states, matches)
        assert s.shape == (2 * n, 2 * n) and s.dtype == torch.float64
        cross = s[:n, n:]
        p = perms[space.name]
        assert torch.allclose(cross[p, torch.arange(n)], torch.ones(n, dtype=torch.float64))
        assert torch.equal(cross.argmax(dim=0), p), space.name
        assert torch.allclose(s[:n, :n], cross[:, p.argsort()], atol=1e-9)
        # ignoring a neighbour's match (if any) loses the exact pairing
        others = {k: v for k, v in matches.items() if k == space.name}
        if len(matches) > 1 and case != "fused":
            loose = weight_similarity(spec, space.name, states, others)[:n, n:]
            assert loose[p, torch.arange(n)].min() < 0.999


def manual_mlp_vectors(states, m2) -> torch.Tensor:
    """h1's unit vectors by hand: fc1 row, fc1 bias, fc2 column rebased with (N*M_i)^T."""
    rows = []
    for i, s in enumerate(states):
        fc2 = (2 * m2.merge_of(i)).T @ s["fc2.weight"].double()
        rows.append(
            torch.cat([s["fc1.weight"].double(), s["fc1.bias"].double()[:, None], fc2.T], dim=1)
        )
    return torch.cat(rows)


def test_inner_and_correlation_kinds_match_manual_vectors() -> None:
    (a, spec), (b, _) = make("mlp", 0), make("mlp", 1)
    states = [a.state_dict(), b.state_dict()]
    m2 = random_zip_match(8, 2, 3)
    x = manual_mlp_vectors(states, m2)
    inner = weight_similarity(spec, "h1", states, {"h2": m2}, kind="inner")
    assert torch.allclose(inner, x @ x.T, atol=1e-9)
    corr = weight_similarity(spec, "h1", states, {"h2": m2, "h1": random_zip_match(8, 2, 4)})
    assert np.allclose(corr.numpy(), np.corrcoef(x.numpy()), atol=1e-9)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["correlation", "inner"])
def test_kept_tensor_shares_equal_a_fresh_similarity(case: str, kind: str) -> None:
    """With versions, WeightSimilarity recomputes only the tensors a changed match
    touches; after any sequence of changes it must equal a from-scratch computation."""
    (a, spec), (b, _) = make(case, 0), make(case, 1)
    states = [a.state_dict(), b.state_dict()]
    names = [s.name for s in spec.mergeable]
    sizes = {s.name: s.size for s in spec.mergeable}
    matches = {k: random_zip_match(sizes[k], 2, i) for i, k in enumerate(names)}
    versions = dict.fromkeys(names, 0)
    kept = WeightSimilarity(spec, states, kind)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(3)
    for step in range(3 * len(names)):
        changed = names[int(torch.randint(len(names), (1,), generator=g))]
        matches[changed] = random_zip_match(sizes[changed], 2, 100 + step)
        versions[changed] += 1
        for name in names:
            got = kept(name, matches, versions)
            fresh = weight_similarity(spec, name, states, matches, kind)  # type: ignore[arg-type]
            assert torch.allclose(got, fresh, rtol=1e-9, atol=1e-12), (step, name)


def test_dead_weight_rows_are_zero_not_nan() -> None:
    (a, spec), (b, _) = make("mlp", 0), make("mlp", 1)
    with torch.no_grad():
        for w in (a.fc1.weight[3], a.fc1.bias[3:4], a.fc2.weight[:, 3]):
            w.zero_()
    s = weight_similarity(spec, "h1", [a.state_dict(), b.state_dict()], {})
    assert not torch.isnan(s).any()
    assert torch.equal(s[3], torch.zeros(16, dtype=torch.float64))
    assert s[0, 0] == pytest.approx(1.0)


def test_activation_similarity_finds_a_permuted_copy() -> None:
    model, spec = make("convres")
    perms = moving_perms(spec)
    copy_, _ = make("convres")
    copy_.load_state_dict(permute_state(spec, model.state_dict(), perms))
    g = torch.Generator().manual_seed(0)
    batches = [CASES["convres"][0].example(g) for _ in range(2)]
    moments = collect_moments([model, copy_], spec, batches)
    for name, m in moments.items():
        s = activation_similarity(m)
        n, p = m.size, perms[name]
        live = m.covariance().diagonal()[:n][p] > 0  # random BN statistics kill some units
        assert live.any()
        pairs = s[:n, n:][p, torch.arange(n)]
        assert torch.allclose(pairs[live], torch.ones(int(live.sum()), dtype=torch.float64))
        assert torch.equal(pairs[~live], torch.zeros(int((~live).sum()), dtype=torch.float64))


def test_dual_similarity_blends_and_checks() -> None:
    sw, sa = torch.rand(4, 4, dtype=torch.float64), torch.rand(4, 4)
    assert torch.allclose(dual_similarity(sw, sa, 0.3), 0.3 * sw + 0.7 * sa.double())
    assert torch.equal(dual_similarity(sw, sa, 1.0), sw)
    with pytest.raises(MudscError, match="alpha"):
        dual_similarity(sw, sa, 1.5)
    with pytest.raises(MudscError, match="shape"):
        dual_similarity(sw, sa[:2], 0.5)


def test_weight_similarity_rejects_bad_requests() -> None:
    model, spec = make("mlp")
    state = model.state_dict()
    with pytest.raises(MudscError, match="kind"):
        weight_similarity(spec, "h1", [state, state], {}, kind="cosine")  # type: ignore[arg-type]
    with pytest.raises(MudscError, match="no space"):
        weight_similarity(spec, "nope", [state, state], {})
    with pytest.raises(MudscError, match="h2"):
        weight_similarity(spec, "h1", [state, state], {"h2": random_zip_match(8, 3, 0)})


def test_dead_ties_fill_only_the_dead_by_dead_block() -> None:
    act = torch.eye(6, dtype=torch.float64)
    act[1, 4] = act[4, 1] = 0.3
    weight = torch.rand(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(with_dead_ties(act, weight), act)  # no dead unit: unchanged
    act[2, 2] = act[5, 5] = 0.0  # units 2 and 5 are dead (a 0 diagonal)
    got = with_dead_ties(act, weight)
    dead = torch.tensor([2, 5])
    assert torch.equal(dead_units(act).nonzero().flatten(), dead)
    assert torch.equal(got[dead][:, dead], weight[dead][:, dead])
    live = torch.ones(6, 6, dtype=torch.bool)
    live[dead[:, None], dead[None, :]] = False
    assert torch.equal(got[live], act[live])
