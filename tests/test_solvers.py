"""Solvers: optimality against brute force, exact recovery, invariants, and input checks."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

from mudsc.errors import MudscError
from mudsc.solvers import (
    SOLVERS,
    Match,
    align,
    block_scores,
    group_align,
    group_zip,
    identity,
    pair_blocks,
    zip_match,
)
from mudsc.solvers import zip as zip_module
from mudsc.solvers.zip import zip_budget

NEG = float("-inf")


@pytest.fixture(autouse=True, params=["numpy", "torch"])
def zip_loop(request, monkeypatch) -> str:
    """Every test runs with both greedy loops: NumPy (the CPU default) and torch (what
    GPUs run), so the two must agree with the reference and with each other."""
    monkeypatch.setattr(zip_module, "_NUMPY_ON_CPU", request.param == "numpy")
    return request.param


# ----------------------------------------------------------------------------- helpers


def random_similarity(n_models: int, n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Pearson correlation of random features: symmetric, unit diagonal, like S_act."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_models * n, 3 * n + 8, generator=gen, dtype=torch.float64)
    x = x - x.mean(dim=1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True)
    return (x @ x.T).to(dtype)


def hidden_similarity(perms: list[np.ndarray], seed: int, noise: float = 0.3) -> torch.Tensor:
    """Model i's unit k is a noisy copy of model 0's unit perms[i][k] (perms[0] = id)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(perms[0])
    base = torch.randn(n, 200, generator=gen, dtype=torch.float64)
    feats = [base[torch.as_tensor(p)] + noise * torch.randn(n, 200, generator=gen) for p in perms]
    x = torch.cat(feats)
    x = x - x.mean(dim=1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True)
    return x @ x.T


def hidden_unmerge(perms: list[np.ndarray]) -> torch.Tensor:
    """The U that puts model i's unit k with model 0's unit perms[i][k]."""
    n = len(perms[0])
    u = torch.zeros(len(perms) * n, n, dtype=torch.float64)
    for i, p in enumerate(perms):
        u[i * n + np.arange(n), torch.as_tensor(p)] = 1.0
    return u


def labels_of(match: Match) -> np.ndarray:
    """Merged unit of every source unit."""
    return match.unmerge.argmax(dim=1).numpy()


def check_structure(match: Match, n_models: int, n: int) -> None:
    """Shape, dtype, 0/1 unmerge with one merged unit per source, averaging merge."""
    u, m = match.unmerge, match.merge
    assert u.shape == m.shape == (n_models * n, n)
    assert u.dtype == m.dtype == torch.float64
    assert torch.isfinite(m).all() and np.isfinite(match.value)
    assert ((u == 0) | (u == 1)).all()
    assert torch.equal(u.sum(dim=1), torch.ones(n_models * n, dtype=torch.float64))
    sizes = u.sum(dim=0)
    assert (sizes >= 1).all() and sizes.sum() == n_models * n
    torch.testing.assert_close(m.sum(dim=0), torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(m, u / sizes)


def brute_best_mean(cross: np.ndarray) -> float:
    """Best mean matched similarity over all permutations."""
    n = cross.shape[0]
    return max(cross[np.arange(n), list(p)].mean() for p in itertools.permutations(range(n)))


def naive_zip(sim: torch.Tensor, n_models: int, a: float, b: float):
    """Spec 4.2 written plainly (full masked argmax per step), the reference for zip_match.

    Returns labels (clusters ordered by lowest unit), picked values, per-model spent
    within-model merges and the number of forced (illegal) merges.
    """
    m = sim.shape[0]
    n = m // n_models
    budget = zip_budget(n, n_models, b)
    work = ((sim + sim.T) / 2).clone()
    work.fill_diagonal_(NEG)
    members = {u: [u] for u in range(m)}
    spent = [0] * n_models
    picked, forced = [], 0

    def owners(c):
        return {u // n for u in members[c]}

    def illegal(r, c):
        orr, oc = owners(r), owners(c)
        if a <= 0:
            return bool(orr & oc)
        if len(orr) == 1 and orr == oc:
            return budget <= 0 or spent[next(iter(orr))] >= budget
        return False

    for _ in range(m - n):
        legal = work.clone()
        for r in members:
            for c in members:
                if r != c and illegal(r, c):
                    legal[r, c] = NEG
        if legal.max() == NEG:
            legal, forced = work, forced + 1
        r, c = divmod(int(legal.argmax()), m)
        i, j = min(r, c), max(r, c)
        picked.append(float(legal[r, c]))
        oi, oj = owners(i), owners(j)
        if a > 0 and len(oi) == 1 and oi == oj:
            spent[next(iter(oi))] += 1
        merged = torch.minimum(work[i], work[j]) * (a if a > 0 else 1.0)
        work[i], work[:, i] = merged, merged
        work[j], work[:, j] = NEG, NEG
        members[i] += members.pop(j)
    labels = np.empty(m, dtype=np.int64)
    for k, root in enumerate(sorted(members)):
        labels[members[root]] = k
    return labels, picked, spent, forced


# ----------------------------------------------------------------------------- align


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_align_is_optimal_two_models(n, seed):
    sim = random_similarity(2, n, seed)
    match = align(sim, 2)
    check_structure(match, 2, n)
    cross = sim[:n, n:].numpy()
    best = brute_best_mean(cross)
    assert match.value == pytest.approx(best, abs=1e-12)
    # the returned assignment itself attains the optimum, model 0 unit j -> merged unit j
    assert torch.equal(match.unmerge_of(0), torch.eye(n, dtype=torch.float64))
    sigma = match.unmerge_of(1).argmax(dim=0).numpy()  # model 1 unit joining merged unit j
    assert cross[np.arange(n), sigma].mean() == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("n", [2, 4, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_align_is_optimal_three_models(n, seed):
    sim = random_similarity(3, n, seed)
    match = align(sim, 3)
    check_structure(match, 3, n)
    bests = [brute_best_mean(sim[:n, i * n : (i + 1) * n].numpy()) for i in (1, 2)]
    assert match.value == pytest.approx(np.mean(bests), abs=1e-12)
    for i in range(3):  # every model contributes exactly one unit to every merged unit
        assert torch.equal(match.unmerge_of(i).sum(dim=0), torch.ones(n, dtype=torch.float64))


@pytest.mark.parametrize("n_models", [2, 3])
def test_align_recovers_hidden_permutation(n_models):
    rng = np.random.default_rng(5)
    perms = [np.arange(24)] + [rng.permutation(24) for _ in range(n_models - 1)]
    sim = hidden_similarity(perms, seed=3)
    match = align(sim, n_models)
    assert torch.equal(match.unmerge, hidden_unmerge(perms))
    torch.testing.assert_close(match.merge, hidden_unmerge(perms) / n_models)


def test_align_float32_keeps_device_and_leaves_input_alone():
    sim = random_similarity(2, 8, 0, dtype=torch.float32)
    before = sim.clone()
    match = align(sim, 2)
    check_structure(match, 2, 8)
    assert match.unmerge.device == sim.device
    assert torch.equal(sim, before)


# ----------------------------------------------------------------------------- zip

ZIP_PARAMS = [(0.5, 1.0), (1e-4, 0.075), (0.0, 1.0), (-1.0, 0.5), (1.0, 0.0), (0.3, 0.4), (2.0, 1)]


@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize(("a", "b"), ZIP_PARAMS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zip_matches_plain_reference_and_invariants(n_models, a, b, seed):
    n = 10
    sim = random_similarity(n_models, n, seed)
    sim[0, n] = sim[n, 0] = 0.999  # a clear first pick
    before = sim.clone()
    match = zip_match(sim, n_models, a=a, b=b)
    assert torch.equal(sim, before)
    check_structure(match, n_models, n)
    labels, picked, spent, forced = naive_zip(sim, n_models, a, b)
    np.testing.assert_array_equal(labels_of(match), labels)
    assert match.value == pytest.approx(float(np.mean(picked)), abs=1e-12)
    assert max(spent) <= zip_budget(n, n_models, b)
    if a <= 0:
        assert sum(spent) == 0
        if n_models == 2:  # with two models the owner rule can always be met
            assert forced == 0
    if forced == 0 and a <= 0:  # no cluster holds two units of one model
        owner = np.repeat(np.arange(n_models), n)
        for k in range(n):
            models = owner[labels == k]
            assert len(models) == len(set(models))
    else:
        assert forced == 0 or (a <= 0 and n_models >= 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zip_dtype_and_sizes(dtype):
    sim = random_similarity(2, 16, 4, dtype=dtype)
    match = zip_match(sim, 2)
    check_structure(match, 2, 16)
    assert match.unmerge.device == sim.device


def test_zip_budget_formula():
    assert zip_budget(512, 2, 1.0) == 256
    assert zip_budget(512, 2, 0.075) == 19
    assert zip_budget(10, 3, 1.0) == 6
    assert zip_budget(10, 3, 0.0) == 0


def test_zip_within_model_budget_bites():
    # model 0's units are near duplicates of each other: with a budget zip merges some of
    # them together; with budget 0 no cluster of two or more units of one model forms.
    n = 6
    sim = random_similarity(2, n, 7) * 0.2
    sim[:n, :n] = 0.9
    sim.fill_diagonal_(1.0)
    free = zip_match(sim, 2, a=0.5, b=1.0)
    strict = zip_match(sim, 2, a=0.5, b=0.0)
    owner = np.repeat([0, 1], n)
    pure_0 = [set(owner[labels_of(free) == k]) == {0} for k in range(n)]
    assert any(pure_0)
    for k in range(n):
        models = owner[labels_of(strict) == k]
        assert len(models) == 1 or len(set(models)) > 1


@pytest.mark.parametrize(
    ("n_models", "a", "b"),
    # not (3, 1e-4): damping a pair's similarity to 1e-4 makes noise pairs beat triples
    [(2, 0.5, 1.0), (2, 0.0, 1.0), (2, 1e-4, 0.075), (3, 0.5, 1.0), (3, 0.0, 1.0)],
)
def test_zip_recovers_hidden_permutation(n_models, a, b):
    rng = np.random.default_rng(11)
    perms = [np.arange(20)] + [rng.permutation(20) for _ in range(n_models - 1)]
    sim = hidden_similarity(perms, seed=2)
    match = zip_match(sim, n_models, a=a, b=b)
    assert torch.equal(match.unmerge, hidden_unmerge(perms))
    if n_models == 2:  # only cross pairs were picked: the same value as alignment
        assert match.value == pytest.approx(align(sim, 2).value, abs=1e-12)


def test_zip_stuck_owner_rule_falls_back_and_warns(caplog):
    # N=3, n=2: the three best pairs use model pairs (0,1), (0,2), (1,2); after them no
    # two clusters are disjoint in models, but one more merge is needed.
    units = {"0a": 0, "0b": 1, "1a": 2, "1b": 3, "2a": 4, "2b": 5}
    sim = torch.zeros(6, 6, dtype=torch.float64)
    for (p, q), v in {("0a", "1a"): 0.9, ("0b", "2b"): 0.8, ("1b", "2a"): 0.7}.items():
        sim[units[p], units[q]] = sim[units[q], units[p]] = v
    sim[units["0a"], units["2a"]] = sim[units["2a"], units["0a"]] = 0.1
    with caplog.at_level(logging.WARNING, logger="mudsc.solvers.zip"):
        match = zip_match(sim, 3, a=0.0)
    check_structure(match, 3, 2)
    assert "no legal partner" in caplog.text
    labels, _, _, forced = naive_zip(sim, 3, 0.0, 1.0)
    assert forced == 1
    np.testing.assert_array_equal(labels_of(match), labels)


@pytest.mark.parametrize("solver", ["align", "zip", "group_align", "group_zip"])
def test_dead_units_never_nan(solver):
    n = 8
    sim = random_similarity(2, n, 1)
    dead = [2, 3, n + 5]
    sim[dead] = 0.0
    sim[:, dead] = 0.0
    run = {
        "align": lambda: align(sim, 2),
        "zip": lambda: zip_match(sim, 2),
        "group_align": lambda: group_align(sim, 2, 2),
        "group_zip": lambda: group_zip(sim, 2, 2),
    }[solver]
    check_structure(run(), 2, n)
    zeros = torch.zeros(2 * n, 2 * n)
    check_structure(zip_match(zeros, 2), 2, n)
    check_structure(align(zeros, 2), 2, n)


# ----------------------------------------------------------------------------- groups


def block_perms(n_models: int, groups: int, g: int, seed: int):
    """Hidden block and within-block permutations as unit permutations per model."""
    rng = np.random.default_rng(seed)
    perms, orders = [np.arange(groups * g)], [np.arange(groups)]
    for _ in range(1, n_models):
        order = rng.permutation(groups)  # model i's block b holds model 0's block order[b]
        unit = np.concatenate([order[b] * g + rng.permutation(g) for b in range(groups)])
        perms.append(unit)
        orders.append(order)
    return perms, orders


def block_of_each_merged_block(match: Match, n_models: int, groups: int) -> np.ndarray:
    """(N, G): the single source block of model i inside merged block t (asserts it)."""
    n = match.size
    g = n // groups
    out = np.empty((n_models, groups), dtype=np.int64)
    for i in range(n_models):
        u = match.unmerge_of(i)
        for t in range(groups):
            rows = torch.nonzero(u[:, t * g : (t + 1) * g].sum(dim=1)).squeeze(1).numpy()
            blocks = set(rows // g)
            assert len(blocks) == 1, f"model {i} merged block {t} mixes blocks {blocks}"
            assert len(rows) == g  # the whole block, nothing else
            out[i, t] = blocks.pop()
    return out


@pytest.mark.parametrize("n_models", [2, 3])
@pytest.mark.parametrize(("groups", "n"), [(2, 8), (4, 8), (3, 12), (8, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_group_solvers_never_split_a_block(n_models, groups, n, seed):
    sim = random_similarity(n_models, n, seed)
    before = sim.clone()
    for match in (
        group_align(sim, n_models, groups),
        group_zip(sim, n_models, groups),
        group_zip(sim, n_models, groups, a=0.0),
        group_zip(sim, n_models, groups, a=1e-4, b=0.075),
    ):
        check_structure(match, n_models, n)
        order = block_of_each_merged_block(match, n_models, groups)
        np.testing.assert_array_equal(order[0], np.arange(groups))
    assert torch.equal(sim, before)


@pytest.mark.parametrize("n_models", [2, 3])
def test_group_align_recovers_hidden_blocks(n_models):
    groups, g = 4, 5
    perms, orders = block_perms(n_models, groups, g, seed=3)
    sim = hidden_similarity(perms, seed=8)
    match = group_align(sim, n_models, groups)
    assert torch.equal(match.unmerge, hidden_unmerge(perms))
    for zipped in (group_zip(sim, n_models, groups), group_zip(sim, n_models, groups, a=0.0)):
        assert torch.equal(zipped.unmerge, hidden_unmerge(perms))
    order = pair_blocks(block_scores(sim, n_models, groups))
    for i in range(1, n_models):  # model 0's block a pairs with model i's block holding it
        np.testing.assert_array_equal(order[i].numpy(), np.argsort(orders[i]))


def test_block_scores_match_brute_force():
    groups, g, n_models = 3, 3, 3
    sim = random_similarity(n_models, groups * g, 6)
    scores = block_scores(sim, n_models, groups)
    assert scores.shape == (n_models, groups, groups) and scores.dtype == torch.float64
    assert torch.equal(scores[0], torch.eye(groups, dtype=torch.float64))
    n = groups * g
    for i in range(1, n_models):
        cross = sim[:n, i * n : (i + 1) * n].numpy()
        for a, b in itertools.product(range(groups), repeat=2):
            block = cross[a * g : (a + 1) * g, b * g : (b + 1) * g]
            assert scores[i, a, b].item() == pytest.approx(brute_best_mean(block), abs=1e-12)


def test_pair_blocks_is_optimal():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 4, 4, generator=gen, dtype=torch.float64)
    order = pair_blocks(scores)
    assert order.dtype == torch.long
    np.testing.assert_array_equal(order[0].numpy(), np.arange(4))
    for i in (1, 2):
        best = max(
            sum(scores[i, a, p[a]].item() for a in range(4))
            for p in itertools.permutations(range(4))
        )
        got = sum(scores[i, a, order[i, a]].item() for a in range(4))
        assert got == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("n_models", [2, 3])
def test_groups_one_equals_ungrouped(n_models):
    sim = random_similarity(n_models, 9, 2)
    for grouped, plain in (
        (group_align(sim, n_models, 1), align(sim, n_models)),
        (group_zip(sim, n_models, 1), zip_match(sim, n_models)),
        (group_zip(sim, n_models, 1, a=0.0, b=0.5), zip_match(sim, n_models, a=0.0, b=0.5)),
        (group_zip(sim, n_models, 1, 1e-4, 0.075), zip_match(sim, n_models, 1e-4, 0.075)),
    ):
        assert torch.equal(grouped.unmerge, plain.unmerge)
        assert torch.equal(grouped.merge, plain.merge)
        assert grouped.value == plain.value


def test_groups_of_one_unit_equal_align():
    sim = random_similarity(2, 7, 3)
    assert torch.equal(group_align(sim, 2, 7).unmerge, align(sim, 2).unmerge)


def test_tied_spaces_share_one_block_order():
    # Two spaces tied in block order (q/k and v).  The weak q/k signal prefers another head
    # order than the strong v signal; pairing each space alone would mix heads.  Summed
    # scores give one order, and both spaces follow it.
    n_models, groups = 2, 4
    perms_v, orders_v = block_perms(n_models, groups, 4, seed=2)
    perms_qk, orders_qk = block_perms(n_models, groups, 4, seed=3)
    sim_qk = hidden_similarity(perms_qk, seed=4, noise=2.0)
    sim_v = hidden_similarity(perms_v, seed=5)
    scores_qk = block_scores(sim_qk, n_models, groups)
    scores_v = block_scores(sim_v, n_models, groups)
    alone_qk, alone_v = pair_blocks(scores_qk), pair_blocks(scores_v)
    assert not torch.equal(alone_qk, alone_v)  # the case that needs tying
    order = pair_blocks(scores_qk + scores_v)
    np.testing.assert_array_equal(order[1].numpy(), np.argsort(orders_v[1]))
    match_qk = group_align(sim_qk, n_models, groups, block_order=order)
    match_v = group_align(sim_v, n_models, groups, block_order=order)
    zip_qk = group_zip(sim_qk, n_models, groups, block_order=order)
    for match in (match_qk, match_v, zip_qk):
        blocks = block_of_each_merged_block(match, n_models, groups)
        np.testing.assert_array_equal(blocks, order.numpy())
    assert torch.equal(match_v.unmerge, hidden_unmerge(perms_v))


def test_given_block_order_is_followed():
    sim = random_similarity(2, 8, 0)
    order = torch.tensor([[0, 1, 2, 3], [3, 1, 0, 2]])
    for match in (
        group_align(sim, 2, 4, block_order=order),
        group_zip(sim, 2, 4, block_order=order),
    ):
        np.testing.assert_array_equal(block_of_each_merged_block(match, 2, 4), order.numpy())


# ----------------------------------------------------------------------------- identity


def test_identity():
    match = identity(5, 3)
    check_structure(match, 3, 5)
    for i in range(3):
        assert torch.equal(match.unmerge_of(i), torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(match.merge, match.unmerge / 3)


# ----------------------------------------------------------------------------- user errors

CALLS = {
    "align": lambda s, n: align(s, n),
    "zip": lambda s, n: zip_match(s, n),
    "group_align": lambda s, n: group_align(s, n, 2),
    "group_zip": lambda s, n: group_zip(s, n, 2),
    "block_scores": lambda s, n: block_scores(s, n, 2),
    # every registered solver, through the one protocol, ungrouped and grouped
    **{f"registered {name}": lambda s, n, name=name: SOLVERS[name].solve(s, n) for name in SOLVERS},
    **{
        f"registered {name} G=2": lambda s, n, name=name: SOLVERS[name].solve(s, n, groups=2)
        for name in SOLVERS
    },
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_nan_and_inf_are_user_errors(name):
    for bad in (float("nan"), float("inf")):
        sim = random_similarity(2, 4, 0)
        sim[1, 6] = bad
        with pytest.raises(MudscError, match="NaN or infinite"):
            CALLS[name](sim, 2)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_bad_shapes_are_user_errors(name):
    with pytest.raises(MudscError, match="square"):
        CALLS[name](torch.zeros(8, 6), 2)
    with pytest.raises(MudscError, match="models times"):
        CALLS[name](torch.zeros(9, 9), 2)
    with pytest.raises(MudscError, match="n_models"):
        CALLS[name](torch.zeros(8, 8), 0)
    with pytest.raises(MudscError, match="floating-point"):
        CALLS[name](torch.zeros(8, 8, dtype=torch.long), 2)


def test_bad_parameters_are_user_errors():
    sim = random_similarity(2, 6, 0)
    with pytest.raises(MudscError, match="groups must divide"):
        group_align(sim, 2, 4)
    with pytest.raises(MudscError, match="positive integer"):
        group_zip(sim, 2, 0)
    with pytest.raises(MudscError, match="budget factor"):
        zip_match(sim, 2, b=-1.0)
    with pytest.raises(MudscError, match="damping"):
        zip_match(sim, 2, a=float("nan"))
    with pytest.raises(MudscError, match="permutation"):
        group_align(sim, 2, 3, block_order=torch.tensor([[0, 1, 2], [0, 0, 2]]))
    with pytest.raises(MudscError, match="shape"):
        group_zip(sim, 2, 3, block_order=torch.tensor([[0, 1, 2]]))
    with pytest.raises(MudscError, match="block scores"):
        pair_blocks(torch.zeros(2, 3))
    with pytest.raises(MudscError, match="NaN"):
        pair_blocks(torch.full((2, 3, 3), float("nan")))


@pytest.mark.parametrize(("a", "b"), [(0.5, 1.0), (1e-4, 0.25), (0.0, 1.0)])
def test_zip_matches_plain_reference_on_a_longer_run(a, b):
    sim = random_similarity(2, 24, 9)
    labels, _, spent, _ = naive_zip(sim, 2, a, b)
    np.testing.assert_array_equal(labels_of(zip_match(sim, 2, a=a, b=b)), labels)
    if b < 1:
        assert max(spent) == zip_budget(24, 2, b)  # the budget was used up and respected


@pytest.mark.parametrize(("n_models", "a", "b"), [(2, 0.5, 1.0), (3, 0.5, 0.3), (3, 0.0, 1.0)])
def test_numpy_and_torch_loops_agree_step_for_step(monkeypatch, n_models, a, b):
    sim = random_similarity(n_models, 150, 3)
    owner = torch.arange(n_models).repeat_interleave(150)
    budget = zip_budget(150, n_models, b)
    monkeypatch.setattr(zip_module, "_NUMPY_ON_CPU", True)
    fast = zip_module.zip_clusters(sim, owner, n_models, 150, a, budget)
    monkeypatch.setattr(zip_module, "_NUMPY_ON_CPU", False)
    slow = zip_module.zip_clusters(sim, owner, n_models, 150, a, budget)
    assert torch.equal(fast[0], slow[0])
    assert fast[1] == slow[1]
