"""partial.py: merged trunk + per-model heads, cut by module path or by a count of spaces."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest
import torch
from archs import DenseNetish, MHANet, SDPABlock
from invariance import randomise_
from safetensors.torch import load_file, save_file
from torch import Tensor, fx, nn

from mudsc.errors import MudscError
from mudsc.models import create
from mudsc.partial import (
    PartialMerge,
    block_map,
    build_partial,
    resolve_stop,
    space_keys,
    stop_choices,
    trunk_spaces,
)
from mudsc.solvers import zip_match
from mudsc.solvers.match import Match, identity_match, match_from_unmerge
from mudsc.spaces import MergeSpec, TracedModel, permute_state, random_permutations, trace_model


class _Scores(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return (q @ k.transpose(-2, -1)) * self.scale


class ScoreNet(nn.Module):
    """Hand-written attention whose per-head scores come out of a module of their own."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.patches = nn.Conv2d(3, dim, 4, stride=4)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scores = _Scores((dim // heads) ** -0.5)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patches(x).flatten(2).transpose(1, 2)
        b, t, d = x.shape
        q, k, v = (
            p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q, self.k, self.v)
        )
        a = self.scores(q, k).softmax(-1)
        x = x + self.out((a @ v).transpose(1, 2).reshape(b, t, d))
        return self.head(x.mean(1))


class SkipNet(nn.Module):
    """A parameter read on both sides of a cut, and a skip from the network input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.skip = nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x) * self.scale)
        return self.fc2(h * self.scale) + self.skip(x)


ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet20": (
        lambda: create("resnet20", in_channels=1, image_size=16, embed_dim=8, width=1),
        (3, 1, 16, 16),
    ),
    "vit": (
        lambda: create(
            "vit", in_channels=1, image_size=8, embed_dim=8, dim=8, depth=2, heads=2, patch_size=4
        ),
        (3, 1, 8, 8),
    ),
    "mlp": (
        lambda: create("mlp", in_channels=1, image_size=4, embed_dim=8, hidden=6, depth=3),
        (3, 1, 4, 4),
    ),
    "densenet": (DenseNetish, (2, 3, 8, 8)),
    "mha": (MHANet, (2, 3, 8, 8)),
    "sdpa": (SDPABlock, (2, 3, 8, 8)),
    "scores": (ScoreNet, (2, 3, 8, 8)),
    "skip": (SkipNet, (3, 4)),
}


_CACHE: dict[str, tuple[nn.Module, TracedModel, Tensor]] = {}


def _setup(arch: str) -> tuple[nn.Module, TracedModel, Tensor]:
    """(randomised float64 model, its trace, an example batch), traced once per arch."""
    if arch not in _CACHE:
        factory, shape = ZOO[arch]
        torch.manual_seed(0)
        model = randomise_(factory().double().eval(), torch.Generator().manual_seed(1))
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        _CACHE[arch] = (model, trace_model(model, x, verify=False), x)
    return _CACHE[arch]


def _fresh(arch: str) -> nn.Module:
    return ZOO[arch][0]().double().eval()


def _permuted_pair(arch: str, seed: int = 3) -> tuple[nn.Module, nn.Module, dict[str, Match]]:
    """A model, a randomly permuted copy, and the true alignment matches between them."""
    model, traced, _ = _setup(arch)
    spec = traced.spec
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    other = _fresh(arch)
    other.load_state_dict(permute_state(model.state_dict(), spec, perms))
    matches = {}
    for s in spec.mergeable:
        eye = torch.eye(s.size, dtype=torch.float64)
        # the copy's unit p is the model's unit perms[p]: U_1[p, k] = [perms[p] == k]
        matches[s.name] = match_from_unmerge(torch.cat([eye, eye[perms[s.name]]]), 2, 1.0)
    return model, other, matches


def _zip_matches(spec: MergeSpec, seed: int) -> dict[str, Match]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for s in spec.mergeable:
        a = torch.randn(2 * s.size, 2 * s.size, generator=gen, dtype=torch.float64)
        out[s.name] = zip_match((a + a.T) / 2, 2)
    return out


# -- exactness -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "stop"),
    [("resnet20", "layer1"), ("resnet20", "layer2"), ("vit", "blocks.0"), ("mlp", "features.2")],
)
def test_two_copies_with_identity_matches_reproduce_the_model(arch: str, stop: str) -> None:
    model, traced, x = _setup(arch)
    spec = traced.spec
    matches = {s.name: identity_match(s.size, 2) for s in spec.mergeable}
    pm = build_partial([model, model], traced, matches, stop)
    with torch.no_grad():
        out, ref = pm(x), model(x)
    assert out.shape == (2, x.shape[0], 8)
    for head in out:
        torch.testing.assert_close(head, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("arch", "stop"),
    [
        ("resnet20", "layer1"),
        ("resnet20", "layer2"),
        ("resnet20", "layer1.1.bn2"),  # inside a residual block: two crossing tensors
        ("resnet20", 1),
        ("vit", "blocks.0"),
        ("vit", "blocks.0.attn.qkv"),  # q|k|v slices of one axis, shape ints, the stream
        ("mlp", "features.2"),
        ("densenet", "bn"),  # an axis that concatenates three spaces
        ("mha", "attn"),  # a tuple-valued module output
        ("sdpa", "k"),  # q after its reshape into heads: blocks and units on two axes
        ("scores", "scores"),  # per-head attention scores: blocks only
        ("skip", 1),  # the input crosses; the head re-reads its own `scale`
    ],
)
def test_permuted_copy_is_recovered_by_both_heads(arch: str, stop: str | int) -> None:
    model, traced, x = _setup(arch)
    _, other, matches = _permuted_pair(arch)
    pm = build_partial([model, other], traced, matches, stop)
    with torch.no_grad():
        out, ref = pm(x), model(x)
    assert out.shape == (2, *ref.shape)
    for head in out:
        torch.testing.assert_close(head, ref, rtol=0, atol=1e-6)


def test_parameter_read_on_both_sides_comes_from_each_heads_own_model() -> None:
    model, traced, x = _setup("skip")
    _, other, matches = _permuted_pair("skip")
    pm = build_partial([model, other], traced, matches, 1)
    assert [c["node"] for c in pm.meta["boundary"]] == ["x", "mul"]
    assert "self.scale" in pm.trunk.code and "self.scale" in pm.heads[1].code
    torch.testing.assert_close(pm.heads[1].scale, other.scale, rtol=0, atol=0)


def test_heads_need_the_unmerge() -> None:
    """The exactness above is not vacuous: feeding the copy's head the merged basis breaks it."""
    model, traced, x = _setup("resnet20")
    _, other, matches = _permuted_pair("resnet20")
    pm = build_partial([model, other], traced, matches, "layer1")
    wrong = build_partial(
        [model, other], traced, {**matches, "layer1.res": identity_match(16, 2)}, "layer1"
    )
    with torch.no_grad():
        good = pm.heads[1](*pm.unmerges[1](*pm.trunk(x)))
        bad = pm.heads[1](*pm.trunk(x))
        skewed = wrong(x)[1]
    torch.testing.assert_close(good, model(x), rtol=0, atol=1e-6)
    assert (bad - good).abs().max() > 1e-3
    assert (skewed - good).abs().max() > 1e-3


# -- specs passed by hand, one trace ---------------------------------------------------


def _renamed(spec: MergeSpec) -> MergeSpec:
    """The same spaces under other names (block ties renamed alike)."""

    def tie(name: str | None) -> str | None:
        return None if name is None else f"tie.{name}"

    spaces = tuple(
        dataclasses.replace(s, name=f"hand.{s.name}", block_tie=tie(s.block_tie))
        for s in spec.spaces
    )
    return MergeSpec(spaces, spec.warnings)


@pytest.mark.parametrize(
    ("arch", "stop"),
    [
        ("resnet20", "layer1.1.bn2"),
        ("vit", "blocks.0.attn.qkv"),
        ("densenet", "bn"),
        ("sdpa", "k"),
        ("scores", "scores"),
    ],
)
def test_a_hand_passed_spec_gives_the_same_partial_merge(arch: str, stop: str) -> None:
    model, traced, x = _setup(arch)
    _, other, matches = _permuted_pair(arch)
    ref = build_partial([model, other], traced, matches, stop)
    renamed = _renamed(traced.spec)
    hand_matches = {f"hand.{name}": m for name, m in matches.items()}
    for spec in (renamed, MergeSpec.from_json(renamed.to_json())):
        pm = build_partial([model, other], traced, hand_matches, stop, spec)
        assert pm.meta["trunk_spaces"] == [f"hand.{n}" for n in ref.meta["trunk_spaces"]]
        got, want = pm.state_dict(), ref.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        with torch.no_grad():
            assert torch.equal(pm(x), ref(x))


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_every_traced_space_maps_to_its_own_layout_key(arch: str) -> None:
    _, traced, _ = _setup(arch)
    assert space_keys(traced, traced.spec.spaces) == dict(traced.keys)
    assert set(traced.keys) == {s.name for s in traced.spec.spaces}


def test_a_hand_spec_that_is_not_the_traced_one_is_refused_by_name() -> None:
    model, traced, _ = _setup("mlp")
    first = traced.spec.mergeable[0]
    moved = dataclasses.replace(
        first, name="mine", producers=(dataclasses.replace(first.producers[0], tensor="nope"),)
    )
    spec = MergeSpec(tuple(moved if s is first else s for s in traced.spec.spaces))
    with pytest.raises(MudscError, match="space 'mine'"):
        build_partial([model, model], traced, {}, "features.2", spec)


def test_one_partial_merge_traces_the_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[nn.Module] = []
    real = fx.Tracer.trace

    def counted(self: fx.Tracer, root: nn.Module, *args: object, **kwargs: object) -> fx.Graph:
        calls.append(root)
        return real(self, root, *args, **kwargs)

    monkeypatch.setattr(fx.Tracer, "trace", counted)
    model, other, matches = _fresh("resnet20"), _fresh("resnet20"), {}
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    traced = trace_model(model, x)
    resolve_stop(traced, "layer1")
    stop_choices(traced)
    pm = build_partial([model, other], traced, matches, "layer1")
    assert len(calls) == 1
    state, meta = pm.to_record()
    PartialMerge.from_record(lambda: _fresh("resnet20"), x, state, meta)
    assert len(calls) == 2


# -- non-permutation (zip) matches -----------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "stop", "pattern"),
    [("resnet20", "layer1", "uk,bkhw->buhw"), ("vit", "blocks.0", "uk,btk->btu")],
)
def test_zip_match_runs_and_unmerge_applies_u(arch: str, stop: str, pattern: str) -> None:
    model, traced, x = _setup(arch)
    spec = traced.spec
    _, other, _ = _permuted_pair(arch)
    matches = _zip_matches(spec, seed=4)
    pm = build_partial([model, other], traced, matches, stop)
    with torch.no_grad():
        out = pm(x)
        shared = pm.trunk(x)
        assert len(shared) == 1
        for i in range(2):
            space = pm.unmerges[i].spaces[0]
            u = matches[space].unmerge_of(i)
            torch.testing.assert_close(pm.unmerges[i].matrix(space), u)
            expected = torch.einsum(pattern, u, shared[0])
            torch.testing.assert_close(pm.unmerges[i](*shared)[0], expected)
    assert out.shape == (2, x.shape[0], 8)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_per_head_tensor_needs_a_head_respecting_match() -> None:
    model, traced, x = _setup("scores")
    spec = traced.spec
    _, other, good = _permuted_pair("scores")
    pm = build_partial([model, other], traced, good, "scores")
    kinds = {s["kind"] for c in pm.meta["boundary"] for s in c["segments"]}
    assert kinds == {"units", "split", "blocks"}
    u = good["qk"].unmerge_of(1)
    assert (block_map(u, 2).sum(1) == 1).all()
    with pytest.raises(MudscError, match="per-head"):
        build_partial([model, other], traced, {**good, **_zip_matches(spec, 5)}, "scores")


# -- the stop point --------------------------------------------------------------------


def test_trunk_spaces_follow_the_cut() -> None:
    model, traced, _ = _setup("resnet20")
    spec = traced.spec
    layer1 = ["layer1.res", "layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1"]
    assert trunk_spaces(spec, resolve_stop(traced, "layer1")) == layer1
    assert trunk_spaces(spec, resolve_stop(traced, 1)) == ["layer1.res", "layer1.0.conv1"]
    cut = resolve_stop(traced, "layer2")
    assert cut.module == "layer2.2.relu2"
    assert "layer2.2.bn2.running_mean" in cut.trunk_tensors
    assert not any(t.startswith("layer3") for t in cut.trunk_tensors)


@pytest.mark.parametrize(
    ("arch", "k", "name"),
    [("mlp", 1, "features.0"), ("resnet20", 4, "layer1.2.bn2"), ("vit", 3, "blocks.0.mlp.fc1")],
)
def test_stop_at_k_spaces_is_the_cut_after_the_kth_completed_space(
    arch: str, k: int, name: str
) -> None:
    model, traced, _ = _setup(arch)
    by_k, by_name = resolve_stop(traced, k), resolve_stop(traced, name)
    assert (by_k.position, by_k.trunk_tensors) == (by_name.position, by_name.trunk_tensors)
    before = resolve_stop(traced, k - 1) if k > 1 else None
    assert before is None or before.position < by_k.position


def test_stop_choices() -> None:
    model, traced, _ = _setup("resnet20")
    spec = traced.spec
    paths, k = stop_choices(traced)
    assert paths[:4] == ["conv1", "bn1", "relu", "layer1"]
    assert {"layer1.0", "layer2", "layer3.2", "head"} <= set(paths)
    assert "layer1.0.conv1" not in paths  # only two levels are listed
    assert k == len(spec.mergeable) == 12


@pytest.mark.parametrize(
    ("stop", "words"),
    [
        ("layer9", ["'layer9'", "layer1, ", "layer3", "1..12"]),
        ("layer1.0.shortcut", ["'layer1.0.shortcut'", "layer2"]),  # inlined away: runs nothing
        (0, ["12 merge spaces", "layer1"]),
        (13, ["12 merge spaces"]),
        (True, ["module path"]),
        (1.5, ["module path"]),
    ],
)
def test_bad_stop_lists_the_choices(stop: object, words: list[str]) -> None:
    model, traced, x = _setup("resnet20")
    with pytest.raises(MudscError) as err:
        build_partial([model, model], traced, {}, stop)  # type: ignore[arg-type]
    for word in words:
        assert word in str(err.value)


def test_build_partial_rejects_bad_models_and_matches() -> None:
    model, traced, x = _setup("mlp")
    with pytest.raises(MudscError, match="at least two"):
        build_partial([model], traced, {}, "features.2")
    three = {"features.0": identity_match(6, 3)}
    with pytest.raises(MudscError, match="3 models"):
        build_partial([model, model], traced, three, "features.2")


# -- records ---------------------------------------------------------------------------


def test_record_round_trip(tmp_path) -> None:
    model, traced, x = _setup("vit")
    spec = traced.spec
    _, other, _ = _permuted_pair("vit")
    pm = build_partial([model, other], traced, _zip_matches(spec, 6), "blocks.0.attn.qkv")
    state, meta = pm.to_record()
    save_file(state, str(tmp_path / "partial.safetensors"))
    text = json.dumps(meta)

    rebuilt = PartialMerge.from_record(
        lambda: _fresh("vit"), x, load_file(str(tmp_path / "partial.safetensors")), json.loads(text)
    )
    assert rebuilt.meta["stop_at"] == "blocks.0.attn.qkv"
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pm(x))


def test_record_refuses_another_architecture() -> None:
    model, traced, x = _setup("resnet20")
    state, meta = build_partial([model, model], traced, {}, "layer1").to_record()
    wider = lambda: create(  # noqa: E731
        "resnet20", in_channels=1, image_size=16, embed_dim=8, width=2
    ).double()
    with pytest.raises(MudscError):
        PartialMerge.from_record(wider, x, state, meta)
    with pytest.raises(MudscError, match="not a partial-merge record"):
        PartialMerge.from_record(lambda: _fresh("resnet20"), x, state, {"spec": {}})
