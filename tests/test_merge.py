"""The merge engine (docs/ALGORITHM.md sections 4-7) on tiny float64 models of the whole zoo.

Exact recovery is the property every method but ``avg`` must have: merging a model with
randomly permuted copies of itself returns the model.  It is provable only where the
solver can tell every unit apart, so the test models are made *identifiable*: every
layer's outputs are shifted to mean 0.5 and scaled to std 1 on the calibration data
(:func:`enliven_`), which leaves no ReLU unit dead.  (A dead unit correlates 0 with
everything; activation-only methods pair dead units by their weights instead, see
tests/test_found_failures.py.)

Also here: presets (alpha = 0 is the activation-only method), block structure of grouped
spaces, dead units, weight sweeps, alpha search, input errors and one end-to-end merge of
models trained on the embedded MNIST subset.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence

import pytest
import torch
from invariance import randomise_
from torch import Tensor, nn

import mudsc.sweeps as sweeps_module
from mudsc.errors import MudscError
from mudsc.layers import has_batchnorm
from mudsc.merge import MergeConfig, MergeResult, merge, merge_models, solver_params
from mudsc.methods import METHODS
from mudsc.models import create, names
from mudsc.renorm import reset_batchnorm
from mudsc.similarity import weight_similarity
from mudsc.solvers.checks import match_from_labels
from mudsc.solvers.match import Match, identity_match
from mudsc.spaces import MergeSpec, Space, permute_state, random_permutations, trace
from mudsc.stats import collect_moments

NOT_AVG = [m for m in METHODS if m != "avg"]
ALIGN = ["rebasin", "act-align", "mudsc-align"]
ZIP = ["zipit", "wzip", "mudsc-zip"]

# Tiny configurations of every zoo model: (arguments, image size).
ZOO: dict[str, tuple[dict, int]] = {
    "mlp": ({"width": 0.03}, 8),
    "resnet20": ({"width": 1}, 8),
    "resnet20-gn": ({"width": 1, "groups": 2}, 8),
    "resnet50": ({"width": 0.0625}, 8),
    "vgg11": ({"width": 0.0625}, 8),
    "vgg11-bn": ({"width": 0.0625}, 8),
    "vit": ({"width": 0.25, "depth": 2, "patch_size": 4}, 8),
}


# -- test models ------------------------------------------------------------------------

_AFFINE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def enliven_(model: nn.Module, batches: Sequence[Tensor], shift: float = 0.5) -> nn.Module:
    """Fold per-channel rescaling into every affine layer, in module order, so that its
    outputs on ``batches`` have mean ``shift`` and std 1 (eval mode): no unit stays dead."""
    model.eval()
    for module in model.modules():
        if not isinstance(module, _AFFINE) or getattr(module, "bias", None) is None:
            continue
        outs: list[Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out, outs=outs: outs.append(out))
        for x in batches:
            model(x)
        handle.remove()
        axis = -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1
        y = torch.cat([o.movedim(axis, -1).reshape(-1, o.shape[axis]) for o in outs])
        mean, std = y.mean(0), y.std(0)
        module.weight.div_(std.view((-1,) + (1,) * (module.weight.dim() - 1)))
        module.bias.sub_(mean).div_(std).add_(shift)
    return model


@dataclasses.dataclass(frozen=True)
class Case:
    """A test model (eval mode, float64), its spec, calibration batches and fresh inputs."""

    model: nn.Module
    spec: MergeSpec
    batches: tuple[Tensor, ...]
    x: Tensor


def _inputs(size: int, count: int, seed: int, batch: int = 8) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, 1, size, size, generator=gen, dtype=torch.float64) for _ in range(count)
    )


@functools.cache
def case(name: str, seed: int = 1) -> Case:
    """Cached: tests must not modify the returned model (merging never does)."""
    kwargs, size = ZOO[name]
    torch.manual_seed(seed)
    model = create(name, in_channels=1, image_size=size, embed_dim=6, **kwargs).double()
    randomise_(model, torch.Generator().manual_seed(seed))
    batches = _inputs(size, 3, seed=100)
    enliven_(model, batches)
    spec = trace(model, batches[0][:2])
    return Case(model, spec, batches, _inputs(size, 1, seed=200, batch=5)[0])


def permuted(c: Case, seed: int) -> tuple[nn.Module, dict[str, Tensor]]:
    """A copy of the model with every non-fixed space permuted, and the permutations."""
    perms = random_permutations(c.spec, torch.Generator().manual_seed(seed))
    copy_ = copy.deepcopy(c.model)
    copy_.load_state_dict(permute_state(c.model.state_dict(), c.spec, perms))
    return copy_, perms


@torch.no_grad()
def rel_err(model: nn.Module, ref: nn.Module, x: Tensor) -> float:
    model.eval()
    ref.eval()
    want = ref(x)
    return float((model(x) - want).abs().max() / want.abs().max())


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def fast(method: str, **kw) -> MergeConfig:
    """patience 1: a sweep that does not improve ends the search (keeps the tests fast)."""
    return MergeConfig(method=method, **{"patience": 1, **kw})


def test_zoo_is_covered() -> None:
    assert set(ZOO) == set(names())


# -- 1. exact recovery ------------------------------------------------------------------


def assert_pairs_recovered(result: MergeResult, spec: MergeSpec, perms: Sequence[dict]) -> None:
    """Permuted unit p of model i shares its merged unit with model 0's unit src[p]."""
    for space in spec.mergeable:
        match = result.matches[space.name]
        for i, perm in enumerate(perms, start=1):
            together = match.unmerge_of(i) @ match.unmerge_of(0).T
            want = nn.functional.one_hot(perm[space.name], space.size).double()
            assert torch.equal(together, want), f"space {space.name}, model {i}"


@pytest.mark.parametrize("method", NOT_AVG)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_permuted_copy_merges_back(name: str, method: str) -> None:
    c = case(name)
    other, perm = permuted(c, seed=3)
    result = merge_models([c.model, other], c.batches, fast(method, repair="none"), spec=c.spec)
    assert rel_err(result.model, c.model, c.x) <= 1e-4
    assert_pairs_recovered(result, c.spec, [perm])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_avg_does_not_recover_a_permuted_copy(name: str) -> None:
    """Negative control: the recovery test can fail."""
    c = case(name)
    other, _ = permuted(c, seed=3)
    result = merge_models([c.model, other], c.batches, MergeConfig("avg", repair="none"))
    assert rel_err(result.model, c.model, c.x) > 0.05


@pytest.mark.parametrize("name", sorted(ZOO))
def test_recovery_with_default_repair(name: str) -> None:
    """BN reset of the recovered model = BN reset of the original on the same data.  REPAIR
    of a recovered model is the identity on *one* calibration batch: with several, each
    batch is standardised with its own statistics during the pass (BatchNorm-style, as in
    Jordan et al.), which moves later layers' measured statistics off their targets."""
    c = case(name)
    other, _ = permuted(c, seed=3)
    bn = has_batchnorm(c.model)
    batches = c.batches if bn else c.batches[:1]
    result = merge_models([c.model, other], batches, fast("mudsc-zip"), spec=c.spec)
    ref = copy.deepcopy(c.model)
    if bn:
        reset_batchnorm(ref, batches, "cpu")
    assert rel_err(result.model, ref, c.x) <= 1e-4


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", ["vgg11-bn", "vit"])
def test_merging_a_model_with_itself_returns_it(name: str, method: str) -> None:
    c = case(name)
    result = merge_models([c.model, c.model], c.batches, fast(method, repair="none"), spec=c.spec)
    assert rel_err(result.model, c.model, c.x) <= 1e-10


# -- 2. three copies --------------------------------------------------------------------


def _three_copy_cases() -> list:
    """Zip runs without re-merge damping (a = 1) or with a <= 0 (one unit per model per
    cluster).  With the default a = 0.5 the third copy of a unit scores only 0.5 against
    the pair already merged, so a within-model pair correlated above 0.5 wins: recovery
    is then not a property of the algorithm.  Weight-only zip is a local search from the
    identity: with a = 1 it stalls on the MLP (relative error ~0.5), so it runs with a = 0."""
    cases = []
    for name in ("mlp", "vit"):
        cases += [pytest.param(name, m, {}, id=f"{name}-{m}") for m in ALIGN]
        zips = [("zipit", 1.0), ("mudsc-zip", 1.0), ("wzip", 0.0)]
        if name == "mlp":
            zips += [("zipit", 0.0), ("mudsc-zip", 0.0)]
        cases += [pytest.param(name, m, {"zip_a": a}, id=f"{name}-{m}-a{a:g}") for m, a in zips]
    return cases


@pytest.mark.parametrize(("name", "method", "extra"), _three_copy_cases())
def test_three_permuted_copies_merge_back(name: str, method: str, extra: dict) -> None:
    c = case(name)
    (b, perm_b), (d, perm_d) = permuted(c, seed=3), permuted(c, seed=4)
    cfg = fast(method, repair="none", **extra)
    result = merge_models([c.model, b, d], c.batches, cfg, spec=c.spec)
    assert rel_err(result.model, c.model, c.x) <= 1e-4
    assert_pairs_recovered(result, c.spec, [perm_b, perm_d])


# -- 3. presets ---------------------------------------------------------------------------


@pytest.mark.parametrize(("dual", "plain"), [("mudsc-zip", "zipit"), ("mudsc-align", "act-align")])
@pytest.mark.parametrize("name", ["vgg11-bn", "vit"])
def test_mudsc_with_alpha_zero_is_its_activation_method(name: str, dual: str, plain: str) -> None:
    models = [case(name, 1).model, case(name, 2).model]
    data = case(name).batches
    spec = case(name).spec
    a = merge_models(models, data, fast(dual, alpha=0.0), spec=spec)
    b = merge_models(models, data, fast(plain), spec=spec)
    assert a.matches.keys() == b.matches.keys()
    for key, m in a.matches.items():
        assert torch.equal(m.unmerge, b.matches[key].unmerge), key
        assert torch.equal(m.merge, b.matches[key].merge), key
    assert states_equal(a.model, b.model)
    # and a weight share changes the result (so the comparison above can fail)
    c = merge_models(models, data, fast(dual, alpha=0.9), spec=spec)
    assert any(not torch.equal(m.unmerge, c.matches[k].unmerge) for k, m in a.matches.items())


# -- 4. block structure ---------------------------------------------------------------------


def block_pairing(space: Space, match: Match) -> list[list[int]]:
    """For each model, the source block merged into each merged block; fails if a merged
    block takes units from two blocks of one model or a block is split."""
    g = space.group_size
    pairing = []
    for i in range(match.n_models):
        u = match.unmerge_of(i)
        blocks = []
        for t in range(space.groups):
            units = u[:, t * g : (t + 1) * g].sum(1).nonzero().flatten().tolist()
            b = units[0] // g if units else -1
            assert units == list(range(b * g, b * g + g)), (
                f"space {space.name}, model {i}: merged block {t} takes units {units}"
            )
            blocks.append(b)
        pairing.append(blocks)
    return pairing


def test_block_check_rejects_a_split_block() -> None:
    space = Space("s", 4, groups=2)
    labels = torch.tensor([0, 1, 2, 3, 0, 2, 1, 3])  # model 1 sends units 1 and 2 across
    u = nn.functional.one_hot(labels, 4).double()
    with pytest.raises(AssertionError, match="merged block 0"):
        block_pairing(space, Match(u / 2, u, 0.0, 2))


@pytest.mark.parametrize("method", NOT_AVG)
@pytest.mark.parametrize("name", ["vit", "resnet20-gn"])
def test_grouped_spaces_keep_whole_blocks(name: str, method: str) -> None:
    spec = case(name).spec
    models = [case(name, 1).model, case(name, 2).model]
    cfg = fast(method, repair="none", max_sweeps=2)
    result = merge_models(models, case(name).batches, cfg, spec=spec)
    grouped = [s for s in spec.mergeable if s.groups > 1]
    assert grouped
    pairings = {s.name: block_pairing(s, result.matches[s.name]) for s in grouped}
    ties = spec.tie_groups()
    assert bool(ties) == (name == "vit")
    for tied in ties.values():
        assert len(tied) == 2
        assert pairings[tied[0]] == pairings[tied[1]], tied


# -- 5. dead units ----------------------------------------------------------------------------


@torch.no_grad()
def _with_dead_units(name: str, seed: int, rows: slice, layer: str, consumer: str) -> nn.Module:
    model = copy.deepcopy(case(name, seed).model)
    producer = model.get_submodule(layer)
    producer.weight[rows] = 0.0
    producer.bias[rows] = -1.0
    if seed == 2:  # the weight vectors of these units are constant too
        model.get_submodule(consumer).weight[:, rows] = 0.0
    return model


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(
    ("name", "layer", "consumer"),
    [("mlp", "features.0", "features.2"), ("vgg11-bn", "features.4", "features.8")],
)
def test_dead_units_give_finite_merges(name: str, layer: str, consumer: str, method: str) -> None:
    c = case(name)
    models = [
        _with_dead_units(name, 1, slice(0, 3), layer, consumer),
        _with_dead_units(name, 2, slice(2, 5), layer, consumer),
    ]
    space = next(
        s.name for s in c.spec.mergeable if any(p.tensor == f"{layer}.weight" for p in s.producers)
    )
    var = collect_moments(models, c.spec, c.batches, spaces=[space])[space].covariance().diagonal()
    n = var.numel() // 2
    assert var[:3].max() < 1e-10 and var[n + 2 : n + 5].max() < 1e-10  # really dead

    result = merge_models(models, c.batches, fast(method), spec=c.spec)
    for key, t in result.model.state_dict().items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), key
    for key, m in result.matches.items():
        assert math.isfinite(m.value) and torch.isfinite(m.merge).all(), key
    with torch.no_grad():
        assert torch.isfinite(result.model(c.x)).all()


# -- 6. weight sweeps ----------------------------------------------------------------------


def _scripted(monkeypatch, values: Sequence[float], per_sweep: int):
    """Make every solve of sweep k return a fresh random pairing with the value
    ``values[k]`` (weight-only methods solve nothing before the sweeps).  A new pairing at
    every solve changes every space's neighbours, so no solve is ever skipped as unchanged
    and sweeps differ from each other."""
    calls = itertools.count()
    gen = torch.Generator().manual_seed(0)

    def solve(group, sims, n_models, solver, params):
        k = next(calls) // per_sweep
        value = values[min(k, len(values) - 1)]
        out = []
        for sp in group:
            n = sp.size
            labels = torch.cat([torch.randperm(n, generator=gen) for _ in range(n_models)])
            out.append(match_from_labels(labels, n, n_models, value))
        return out

    monkeypatch.setattr(sweeps_module, "solve_group", solve)


def _sweep(method: str = "rebasin", name: str = "mlp", **kw) -> MergeResult:
    c = case(name)
    cfg = MergeConfig(method=method, repair="none", **kw)
    return merge_models([c.model, case(name, 2).model], c.batches, cfg, spec=c.spec)


def test_sweeps_stop_after_patience_and_keep_the_best(monkeypatch) -> None:
    _scripted(monkeypatch, [0.1, 0.5, 0.4, 0.3, 0.45, 0.9], per_sweep=3)
    seen: list[tuple] = []
    c = case("mlp")
    cfg = MergeConfig("rebasin", repair="none", patience=3)
    result = merge_models(
        [c.model, case("mlp", 2).model], c.batches, cfg, spec=c.spec,
        progress=lambda *args: seen.append(args),
    )  # fmt: skip
    assert result.sweeps == 5  # best at sweep 2, then 3 sweeps without improvement
    assert set(result.space_values.values()) == {0.5}
    assert {m.value for m in result.matches.values()} == {0.5}
    assert seen == [("weight sweeps", k, 100) for k in range(1, 6)]


def test_sweeps_stop_at_max_sweeps(monkeypatch) -> None:
    _scripted(monkeypatch, [0.1 * k for k in range(1, 20)], per_sweep=3)
    result = _sweep(max_sweeps=4, patience=50)
    assert result.sweeps == 4
    assert all(v == pytest.approx(0.4) for v in result.space_values.values())


def test_gains_below_tolerance_do_not_count(monkeypatch) -> None:
    _scripted(monkeypatch, [0.5 + 1e-12 * k for k in range(20)], per_sweep=3)
    result = _sweep(patience=2, tolerance=1e-9)
    assert result.sweeps == 3
    assert set(result.space_values.values()) == {0.5}


@pytest.mark.parametrize("patience", [1, 3])
def test_sweeps_without_any_gain_end_after_patience(patience: int) -> None:
    """alpha = 0: every sweep solves the same activation similarities, so only the first
    sweep improves on nothing."""
    result = _sweep("mudsc-align", alpha=0.0, patience=patience)
    assert result.sweeps == patience + 1


def test_sweep_order_is_seeded_and_new_each_sweep(monkeypatch) -> None:
    groups = len(case("vgg11").spec.mergeable)  # no tied spaces: one solve group each
    orders = []
    real = sweeps_module.visit_order
    for seed in (0, 0, 1):
        order: list[list[int]] = []
        monkeypatch.setattr(
            sweeps_module,
            "visit_order",
            lambda n, gen, seen=order: seen.append(real(n, gen)) or seen[-1],
        )
        _scripted(monkeypatch, [0.1 * k for k in range(1, 9)], per_sweep=groups)
        _sweep(name="vgg11", seed=seed, max_sweeps=4)
        orders.append(order)
        monkeypatch.undo()
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]
    assert len(orders[0]) == 4 and len({tuple(o) for o in orders[0]}) > 1
    assert all(sorted(o) == list(range(groups)) for o in orders[0])  # every group once a sweep


def _plain_sweeps(models, spec: MergeSpec, cfg: MergeConfig) -> dict[str, Match]:
    """docs/ALGORITHM.md section 5's weight sweeps written plainly: every similarity from
    scratch, every space solved at every visit (weight-only methods, no tied spaces)."""
    method = METHODS[cfg.method]
    kind = method.similarity_record.weights
    solver, params = method.solver_record, solver_params(method, cfg)
    states = [m.state_dict() for m in models]
    spaces = list(spec.mergeable)
    matches = {s.name: identity_match(s.size, 2) for s in spaces}
    best, best_score, stale = dict(matches), -math.inf, 0
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.max_sweeps):
        for u in sweeps_module.visit_order(len(spaces), gen):
            s = weight_similarity(spec, spaces[u].name, states, matches, kind)
            group = (spaces[u],)
            matches[spaces[u].name] = sweeps_module.solve_group(group, [s], 2, solver, params)[0]
        score = sweeps_module.sweep_score(matches)
        if score > best_score + cfg.tolerance:
            best, best_score, stale = dict(matches), score, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    return best


@pytest.mark.parametrize("method", ["wzip", "rebasin"])
def test_reused_similarities_and_skipped_solves_change_nothing(monkeypatch, method) -> None:
    """The engine recomputes a tensor's share of a similarity only when a neighbour's
    match changed and re-solves a solve group only when its similarity changed; the plain loop
    recomputes and re-solves everything.  Both must give the same matches."""
    c = case("vgg11")
    models = [c.model, case("vgg11", 2).model]
    cfg = MergeConfig(method, repair="none", patience=3)
    expected = _plain_sweeps(models, c.spec, cfg)
    solves = []
    real = sweeps_module.solve_group
    monkeypatch.setattr(
        sweeps_module, "solve_group", lambda *a: solves.append(a[0][0].name) or real(*a)
    )
    result = merge_models(models, c.batches, cfg, spec=c.spec)
    assert len(solves) < result.sweeps * len(c.spec.mergeable)  # some solves were skipped
    for name, m in expected.items():
        assert torch.equal(m.unmerge, result.matches[name].unmerge), name
        assert m.value == pytest.approx(result.matches[name].value, rel=1e-9), name


def test_same_seed_same_result() -> None:
    a = _sweep("mudsc-zip", name="vgg11", seed=5, max_sweeps=3)
    b = _sweep("mudsc-zip", name="vgg11", seed=5, max_sweeps=3)
    assert states_equal(a.model, b.model)
    assert all(torch.equal(m.unmerge, b.matches[k].unmerge) for k, m in a.matches.items())


# -- 7. alpha search -----------------------------------------------------------------------

GRID = (0.2, 0.5, 0.8)


def _auto_models() -> list[nn.Module]:
    return [case("mlp", 1).model, case("mlp", 2).model]


def test_alpha_auto_scores_every_alpha_on_held_out_data() -> None:
    batches = _inputs(8, 5, seed=7)
    models = _auto_models()
    # every candidate repaired on all fit batches: the winner is the model that was scored
    cfg = fast("mudsc-align", alpha="auto", alpha_grid=GRID, holdout=0.2, alpha_repair_batches=0)
    result = merge_models(models, batches, cfg, spec=case("mlp").spec)
    assert set(result.alpha_scores) == set(GRID)
    assert result.alpha == max(GRID, key=result.alpha_scores.__getitem__)
    assert result.calibration_batches == 4  # the last batch is held out
    with torch.no_grad():  # the default score: mean cosine to every source, held-out batch
        out = result.model(batches[-1])
        cos = [nn.functional.cosine_similarity(out, m(batches[-1]), dim=1) for m in models]
    assert result.alpha_scores[result.alpha] == pytest.approx(float(torch.cat(cos).mean()))
    assert result.card()["alpha_scores"] == {str(a): s for a, s in result.alpha_scores.items()}


def test_timings_name_every_stage_that_ran() -> None:
    """bench/merge.py and the merge card read these keys."""
    c = case("mlp")
    cfg = fast("mudsc-zip", alpha="auto", alpha_grid=GRID, max_sweeps=2)
    result = merge_models(_auto_models(), c.batches, cfg, spec=c.spec)
    stages = {"trace", "statistics", "solve", "sweeps", "apply", "repair", "alpha search"}
    assert set(result.timings) == stages | {"assignment"}
    assert all(t >= 0 for t in result.timings.values())
    avg = merge_models(_auto_models(), c.batches, fast("avg"), spec=c.spec)
    assert set(avg.timings) == {"trace", "solve", "apply", "repair", "assignment"}
    assert avg.timings["assignment"] == 0.0


def test_alpha_auto_with_a_user_score() -> None:
    scores = iter([0.3, 0.9, 0.1])
    seen: list[MergeResult] = []

    def score(candidate: MergeResult) -> float:
        seen.append(candidate)
        assert candidate.alpha == GRID[len(seen) - 1] and candidate.matches
        return next(scores)

    c = case("mlp")
    cfg = fast("mudsc-zip", alpha="auto", alpha_grid=GRID, alpha_repair_batches=0)
    result = merge_models(_auto_models(), c.batches, cfg, spec=c.spec, score_fn=score)
    assert result.alpha_scores == {0.2: 0.3, 0.5: 0.9, 0.8: 0.1}
    assert result.alpha == 0.5
    assert result.model is seen[1].model
    assert result.calibration_batches == len(c.batches)  # nothing held out


def test_alpha_auto_leaves_train_mode_sources_untouched() -> None:
    """The default score runs the sources; BatchNorm in train mode would rewrite them."""
    models = [copy.deepcopy(case("vgg11-bn", s).model).train() for s in (1, 2)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    cfg = fast("mudsc-align", alpha="auto", alpha_grid=(0.3, 0.7), max_sweeps=1)
    merge_models(models, _inputs(8, 4, seed=7), cfg)  # traces the train-mode model too
    for m, state in zip(models, before, strict=True):
        assert m.training and all(sub.training for sub in m.modules())
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


# -- 8. bad input -----------------------------------------------------------------------------


def _counting(models: Sequence[nn.Module]) -> list[int]:
    calls = [0]
    for m in models:
        m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _mlp(width: float = 0.03) -> nn.Module:
    torch.manual_seed(0)
    return create("mlp", in_channels=1, image_size=8, embed_dim=6, width=width)


def _broken(value: float) -> list[nn.Module]:
    models = [_mlp(), _mlp()]
    with torch.no_grad():
        models[1].features[2].weight[0, 0] = value
    return models


def _data() -> list[Tensor]:
    return [torch.randn(4, 1, 8, 8)]


BAD: list = [
    pytest.param(
        lambda: (
            [_mlp(), create("vgg11", in_channels=1, image_size=8, embed_dim=6, width=0.1)],
            {},
        ),
        ["model 1 is a VGG11", "model 0 is a MLP"],
        id="architectures",
    ),
    pytest.param(
        lambda: ([_mlp(0.03), _mlp(0.06)], {}),
        ["'features.0.weight'", "model 1", "widths"],
        id="widths",
    ),
    pytest.param(lambda: ([_mlp()], {}), ["at least two models, got 1"], id="one-model"),
    pytest.param(lambda: ([], {}), ["at least two models, got 0"], id="no-model"),
    pytest.param(
        lambda: ([_mlp(), _mlp()], {"data": []}),
        ["'act-align'", "calibration data"],
        id="no-data",
    ),
    pytest.param(
        lambda: ([_mlp(), _mlp()], {"data": [torch.empty(0, 1, 8, 8)]}),
        ["calibration data"],
        id="empty-batch",
    ),
    pytest.param(lambda: (_broken(math.nan), {}), ["model 1", "'features.2.weight'"], id="nan"),
    pytest.param(lambda: (_broken(-math.inf), {}), ["model 1", "'features.2.weight'"], id="inf"),
    pytest.param(
        lambda: ([_mlp(), _mlp()], {"method": "mudsc"}),
        ["unknown method 'mudsc'", *METHODS],
        id="method",
    ),
    pytest.param(lambda: ([_mlp(), _mlp()], {"alpha": -0.1}), ["alpha"], id="alpha-negative"),
    pytest.param(lambda: ([_mlp(), _mlp()], {"alpha": 1.5}), ["alpha"], id="alpha-large"),
    pytest.param(lambda: ([_mlp(), _mlp()], {"alpha": math.nan}), ["alpha"], id="alpha-nan"),
    pytest.param(lambda: ([_mlp(), _mlp()], {"alpha": "half"}), ["alpha"], id="alpha-text"),
    pytest.param(
        lambda: ([_mlp(), _mlp()], {"alpah": 0.5}),
        ["unknown merge option", "'alpah'"],
        id="keyword",
    ),
]


@pytest.mark.parametrize(("build", "words"), BAD)
def test_bad_input_fails_before_any_work(
    build: Callable, words: list[str], tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    models, kwargs = build()
    kwargs = {"data": _data(), "method": "act-align", **kwargs}
    states = [copy.deepcopy(m.state_dict()) for m in models]
    calls = _counting(models)
    with pytest.raises(MudscError) as info:
        merge(models, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert calls[0] == 0, "a model ran before the input was rejected"
    for m, state in zip(models, states, strict=True):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, state[k], rtol=0, atol=0, equal_nan=True)
    assert not list(tmp_path.iterdir())


# -- 10. end to end on real data ------------------------------------------------------------


@pytest.mark.slow
def test_mudsc_zip_beats_averaging_on_embedded_mnist() -> None:
    from mudsc.data import draw_calibration, load_dataset, split_classes
    from mudsc.evaluate import evaluate
    from mudsc.models.head import ClassEmbeddingHead
    from mudsc.train import TrainConfig, train

    data = load_dataset("embedded")
    tasks = split_classes(10, [5, 5], 0)
    head = ClassEmbeddingHead.orthonormal(10, 512, 0)
    arch = {"width": 0.25, "depth": 2}  # an MLP: seconds to train on a CPU
    models = []
    for i, classes in enumerate(tasks):
        cfg = TrainConfig(epochs=3, batch_size=100, lr=0.05, warmup_epochs=0.5, seed=i + 1)
        models.append(train("mlp", data, classes, head, cfg, arch).model)
    images, labels = data.normalize(data.test_images), data.test_labels
    for i, m in enumerate(models):  # the sources learnt their own task
        assert evaluate(m, images, labels, tasks, head).per_task[i] > 0.8
    union = sorted(c for t in tasks for c in t)
    batches = draw_calibration(data, union, 300, 100, seed=0, device="cpu").batches
    joint = {
        method: evaluate(merge(models, batches, method), images, labels, tasks, head).joint
        for method in ("avg", "mudsc-zip")
    }
    assert joint["mudsc-zip"] >= joint["avg"] + 0.10, joint
