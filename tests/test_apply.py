"""apply.py: the shared transform and the final merge, on tiny models with hand-made specs.

The tiny models, specs and the hand-written permutation below are also imported by
test_similarity.py and test_stats.py (plain helpers, no test functions).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mudsc.apply import apply_matches, contract_axis, transform_state
from mudsc.errors import MudscError
from mudsc.solvers.match import Match, identity_match, match_from_unmerge
from mudsc.spaces.spec import Member, MergeSpec, Space, Tap

# -- tiny models with hand-written specs ------------------------------------------------


class TinyMLP(nn.Module):
    """6 -> 8 -> 8 -> 3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))

    example = staticmethod(lambda g: torch.randn(5, 6, generator=g))


def mlp_spec() -> MergeSpec:
    return MergeSpec(
        (
            Space(
                "h1",
                8,
                producers=(Member("fc1.weight", 0), Member("fc1.bias", 0)),
                consumers=(Member("fc2.weight", 1),),
                taps=(Tap("fc2"),),
            ),
            Space(
                "h2",
                8,
                producers=(Member("fc2.weight", 0), Member("fc2.bias", 0)),
                consumers=(Member("fc3.weight", 1),),
                taps=(Tap("fc3"),),
            ),
        )
    )


class ConvRes(nn.Module):
    """conv-bn-relu, then a residual block (conv-bn-relu-conv-bn + add), pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(a)))
        y = self.relu3(a + self.bn3(self.conv3(h)))
        return self.fc(self.pool(y).flatten(1))

    example = staticmethod(lambda g: torch.randn(2, 3, 5, 5, generator=g))


def _bn(name: str) -> tuple[tuple[Member, ...], tuple[Member, ...]]:
    producers = (Member(f"{name}.weight", 0), Member(f"{name}.bias", 0))
    ignored = (Member(f"{name}.running_mean", 0), Member(f"{name}.running_var", 0))
    return producers, ignored


def convres_spec() -> MergeSpec:
    bn1, bn1_ign = _bn("bn1")
    bn2, bn2_ign = _bn("bn2")
    bn3, bn3_ign = _bn("bn3")
    return MergeSpec(
        (
            Space(
                "res",
                4,
                producers=(Member("conv1.weight", 0), Member("conv1.bias", 0), *bn1)
                + (Member("conv3.weight", 0), Member("conv3.bias", 0), *bn3),
                consumers=(Member("conv2.weight", 1), Member("fc.weight", 1)),
                ignored=bn1_ign + bn3_ign,
                taps=(Tap("conv2"), Tap("fc")),
            ),
            Space(
                "h",
                4,
                producers=(Member("conv2.weight", 0), Member("conv2.bias", 0), *bn2),
                consumers=(Member("conv3.weight", 1),),
                ignored=bn2_ign,
                taps=(Tap("conv3"),),
            ),
        )
    )


class Fused(nn.Module):
    """One Linear whose rows hold two spaces (a: 0..3, b: 4..7), read apart and as a cat."""

    def __init__(self) -> None:
        super().__init__()
        self.fused, self.act = nn.Linear(5, 8), nn.ReLU()
        self.head_a, self.head_b, self.head_cat = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.fused(x))
        return self.head_a(y[:, :4]) + self.head_b(y[:, 4:]) + self.head_cat(y)

    example = staticmethod(lambda g: torch.randn(6, 5, generator=g))


def fused_spec() -> MergeSpec:
    def space(name: str, start: int, head: str) -> Space:
        return Space(
            name,
            4,
            producers=(Member("fused.weight", 0, start), Member("fused.bias", 0, start)),
            consumers=(Member(f"{head}.weight", 1), Member("head_cat.weight", 1, start)),
            taps=(Tap("act", "output", axis=1, start=start),),
        )

    return MergeSpec((space("a", 0, "head_a"), space("b", 4, "head_b")))


class Flat(nn.Module):
    """conv (3 channels on 2x2) -> flatten C*H*W -> Linear(12, 5) -> Linear(5, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU()
        self.fc, self.act, self.out = nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.fc(self.relu(self.conv(x)).flatten(1))))

    example = staticmethod(lambda g: torch.randn(3, 2, 4, 4, generator=g))


def flat_spec() -> MergeSpec:
    return MergeSpec(
        (
            Space(
                "c",
                3,
                producers=(Member("conv.weight", 0), Member("conv.bias", 0)),
                consumers=(Member("fc.weight", 1, inner=4),),
                taps=(Tap("fc", inner=4), Tap("relu", "output")),
            ),
            Space(
                "f",
                5,
                producers=(Member("fc.weight", 0), Member("fc.bias", 0)),
                consumers=(Member("out.weight", 1),),
                taps=(Tap("out"),),
            ),
        )
    )


class Grouped(nn.Module):
    """1x1 conv to 4 channels, grouped 3x3 conv (2 groups) to 6, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.relu_a = nn.Conv2d(2, 4, 1), nn.ReLU()
        self.gconv, self.relu_g = nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu_g(self.gconv(self.relu_a(self.conv_a(x))))
        return self.fc(y.mean(dim=(2, 3)))

    example = staticmethod(lambda g: torch.randn(2, 2, 4, 4, generator=g))


def grouped_spec() -> MergeSpec:
    return MergeSpec(
        (
            Space(
                "s1",
                4,
                groups=2,
                producers=(Member("conv_a.weight", 0), Member("conv_a.bias", 0)),
                consumers=(Member("gconv.weight", 1, per_group=True),),
                taps=(Tap("gconv"),),
                block_tie="t",
            ),
            Space(
                "s2",
                6,
                groups=2,
                producers=(Member("gconv.weight", 0), Member("gconv.bias", 0)),
                consumers=(Member("fc.weight", 1),),
                taps=(Tap("fc"),),
                block_tie="t",
            ),
        )
    )


CASES = {
    "mlp": (TinyMLP, mlp_spec),
    "convres": (ConvRes, convres_spec),
    "fused": (Fused, fused_spec),
    "flat": (Flat, flat_spec),
    "grouped": (Grouped, grouped_spec),
}


def make(case: str, seed: int = 0) -> tuple[nn.Module, MergeSpec]:
    """A model with random weights (and random BN statistics) in eval mode, and its spec."""
    cls, spec_fn = CASES[case]
    torch.manual_seed(seed)
    model = cls()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(7 + seed)
        for name, p in model.named_parameters():
            if ".bias" in name or name.startswith("bn"):
                p.normal_()
    return model.eval(), spec_fn()


# -- permuting by hand --------------------------------------------------------------------


def random_perms(spec: MergeSpec, seed: int) -> dict[str, Tensor]:
    """new unit k = old unit p[k]; block-respecting, with one block order per tie."""
    g = torch.Generator().manual_seed(seed)
    block_order: dict[str, Tensor] = {}
    perms = {}
    for s in spec.mergeable:
        key = s.block_tie or s.name
        if key not in block_order:
            block_order[key] = torch.randperm(s.groups, generator=g)
        pi = block_order[key]
        gs = s.group_size
        perms[s.name] = torch.cat(
            [pi[t] * gs + torch.randperm(gs, generator=g) for t in range(s.groups)]
        )
    return perms


def moving_perms(spec: MergeSpec) -> dict[str, Tensor]:
    """Random permutations that move every space, and the blocks of every grouped one."""
    for seed in range(100):
        perms = random_perms(spec, seed)
        if all(
            not torch.equal(p, torch.arange(len(p)))
            and (s.groups == 1 or int(p[0]) // s.group_size != 0)
            for s in spec.mergeable
            for p in [perms[s.name]]
        ):
            return perms
    raise AssertionError("no moving permutation found")


def permute_state(spec: MergeSpec, state: dict[str, Tensor], perms: dict[str, Tensor]) -> dict:
    """Apply the permutations member by member, written independently of mudsc.apply."""
    out = {k: v.clone() for k, v in state.items()}
    grouped = []
    for s in spec.mergeable:
        p = perms[s.name]
        for _, m in s.members():
            if m.per_group:
                grouped.append((s, m))
                continue
            t = out[m.tensor]
            idx = torch.arange(t.shape[m.axis])
            pos = (m.start + p[:, None] * m.inner + torch.arange(m.inner)).reshape(-1)
            idx[m.start : m.start + s.size * m.inner] = pos
            out[m.tensor] = t.index_select(m.axis, idx)
    row_perm = {m.tensor: perms[s.name] for s in spec.mergeable for m in s.producers}
    for s, m in grouped:  # rows already moved; fix each row's within-group inputs
        t, p_in, p_out = out[m.tensor], perms[s.name], row_perm[m.tensor]
        new = t.clone()
        rows_per_group, gs = t.shape[0] // s.groups, s.group_size
        for o in range(t.shape[0]):
            new_block, old_block = o // rows_per_group, int(p_out[o]) // rows_per_group
            for j in range(gs):
                new[o, j] = t[o, int(p_in[new_block * gs + j]) - old_block * gs]
        out[m.tensor] = new
    return out


def perm_matrix(p: Tensor) -> Tensor:
    """P[k, p[k]] = 1: the permuted model's unit k is the original's unit p[k]."""
    mat = torch.zeros(len(p), len(p), dtype=torch.float64)
    mat[torch.arange(len(p)), p] = 1.0
    return mat


def true_matches(perms: dict[str, Tensor]) -> dict[str, Match]:
    """Matches that put [original, permuted copy] back in the original's order."""
    return {
        name: match_from_unmerge(
            torch.cat([torch.eye(len(p), dtype=torch.float64), perm_matrix(p)]), 2, 1.0
        )
        for name, p in perms.items()
    }


def random_zip_match(n: int, n_models: int, seed: int) -> Match:
    """A random many-to-one membership where every merged unit gets at least one unit."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_models * n, generator=g)
    cluster = torch.empty(n_models * n, dtype=torch.long)
    cluster[order[:n]] = torch.arange(n)
    cluster[order[n:]] = torch.randint(0, n, (n_models * n - n,), generator=g)
    unmerge = torch.zeros(n_models * n, n, dtype=torch.float64)
    unmerge[torch.arange(n_models * n), cluster] = 1.0
    return match_from_unmerge(unmerge, n_models, 0.5)


def load(case: str, state: dict[str, Tensor]) -> nn.Module:
    model, _ = make(case)
    model.load_state_dict(state)
    return model.eval()


# -- tests --------------------------------------------------------------------------------


def test_contract_axis_slice_and_inner() -> None:
    t = torch.randn(2, 11, 3)
    mat = torch.randn(3, 3, dtype=torch.float64)
    out = contract_axis(t, 1, mat, start=2, inner=2)
    assert out.dtype == t.dtype and out.shape == t.shape  # computed in the tensor's dtype
    units = t[:, 2:8].double().reshape(2, 3, 2, 3)
    expected = torch.einsum("auib,uk->akib", units, mat).reshape(2, 6, 3)
    assert torch.allclose(out[:, 2:8].double(), expected, atol=1e-5)
    assert torch.equal(out[:, :2], t[:, :2]) and torch.equal(out[:, 8:], t[:, 8:])


def test_contract_axis_scatter_path_equals_dense_product() -> None:
    """One non-zero per row (every solver's M and U) takes the scatter path: same result."""
    t = torch.randn(5, 6, 4, dtype=torch.float64)
    target = torch.tensor([2, 0, 1, 1, 3, 2])
    mat = torch.zeros(6, 4, dtype=torch.float64)
    mat[torch.arange(6), target] = torch.rand(6, dtype=torch.float64) + 0.5
    out = contract_axis(t, 1, mat)
    expected = torch.einsum("aub,uk->akb", t, mat)
    assert torch.allclose(out, expected, atol=1e-12)
    with pytest.raises(MudscError, match="positions"):
        contract_axis(t, 1, torch.eye(5, dtype=torch.float64), start=2, inner=2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merging_a_permuted_copy_returns_the_model(case: str) -> None:
    model, spec = make(case)
    spec.validate(model)
    state = model.state_dict()
    perms = moving_perms(spec)
    permuted = permute_state(spec, state, perms)
    x = CASES[case][0].example(torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
        assert torch.allclose(load(case, permuted)(x), reference, atol=1e-5)  # spec is right
        merged = apply_matches(spec, [state, permuted], true_matches(perms))
        for key, value in state.items():
            assert merged[key].dtype == value.dtype
            assert torch.allclose(merged[key], value, atol=1e-6), key
        assert torch.allclose(load(case, merged)(x), reference, atol=1e-5)


def test_identity_matches_give_the_plain_average() -> None:
    (a, spec), (b, _) = make("convres", 0), make("convres", 1)
    sa, sb = a.state_dict(), b.state_dict()
    sb["bn1.num_batches_tracked"] = torch.tensor(10)
    matches = {s.name: identity_match(s.size, 2) for s in spec.mergeable}
    merged = apply_matches(spec, [sa, sb], matches)
    assert set(merged) == set(sa)
    for key in sa:
        if sa[key].is_floating_point():
            assert merged[key].dtype == torch.float32
            assert torch.allclose(merged[key], (sa[key] + sb[key]) / 2, atol=1e-6), key
    assert merged["bn1.num_batches_tracked"].dtype == torch.int64
    assert int(merged["bn1.num_batches_tracked"]) == round((7 + 10) / 2)
    assert torch.equal(merged["bn2.num_batches_tracked"], torch.tensor(8))  # (7 + 8) / 2, rounded
    assert torch.equal(apply_matches(spec, [sa, sb], {})["conv2.weight"], merged["conv2.weight"])


def test_zip_matches_follow_the_merge_formula() -> None:
    (a, spec), (b, _) = make("mlp", 0), make("mlp", 1)
    states = [a.state_dict(), b.state_dict()]
    m1, m2 = random_zip_match(8, 2, 1), random_zip_match(8, 2, 2)
    merged = apply_matches(spec, states, {"h1": m1, "h2": m2})
    w1 = torch.cat([s["fc1.weight"].double() for s in states])
    assert torch.allclose(merged["fc1.weight"].double(), m1.merge.T @ w1, atol=1e-6)
    fc2 = (
        sum(
            (2 * m2.merge_of(i)).T @ s["fc2.weight"].double() @ m1.unmerge_of(i)
            for i, s in enumerate(states)
        )
        / 2
    )
    assert torch.allclose(merged["fc2.weight"].double(), fc2, atol=1e-6)
    fc3 = sum(s["fc3.weight"].double() @ m2.unmerge_of(i) for i, s in enumerate(states)) / 2
    assert torch.allclose(merged["fc3.weight"].double(), fc3, atol=1e-6)
    assert torch.allclose(merged["fc3.bias"], (states[0]["fc3.bias"] + states[1]["fc3.bias"]) / 2)


def test_fused_slices_are_split_transformed_and_refused() -> None:
    model, spec = make("fused")
    state = model.state_dict()
    ma, mb = random_zip_match(4, 2, 5), random_zip_match(4, 2, 6)
    out = transform_state(spec, state, 1, {"a": ma, "b": mb})
    w = state["fused.weight"].double()
    expected = torch.cat([(2 * ma.merge_of(1)).T @ w[:4], (2 * mb.merge_of(1)).T @ w[4:]])
    assert torch.allclose(out["fused.weight"].double(), expected, atol=1e-6)
    cat = state["head_cat.weight"].double()
    expected = torch.cat([cat[:, :4] @ ma.unmerge_of(1), cat[:, 4:] @ mb.unmerge_of(1)], dim=1)
    assert torch.allclose(out["head_cat.weight"].double(), expected, atol=1e-6)
    assert out["head_cat.bias"] is state["head_cat.bias"]  # untouched tensors pass through
    only_a = transform_state(spec, state, 1, {"a": ma, "b": mb}, skip_space="b")
    assert torch.equal(only_a["fused.weight"][4:], state["fused.weight"][4:])
    assert torch.equal(only_a["fused.weight"][:4], out["fused.weight"][:4])


def test_inner_member_transforms_each_unit_block() -> None:
    model, spec = make("flat")
    state = model.state_dict()
    mc = random_zip_match(3, 2, 7)
    out = transform_state(spec, state, 0, {"c": mc})
    w = state["fc.weight"].double().reshape(5, 3, 4)
    expected = torch.einsum("oui,uk->oki", w, mc.unmerge_of(0)).reshape(5, 12)
    assert torch.allclose(out["fc.weight"].double(), expected, atol=1e-6)
    assert out["fc.weight"].dtype == torch.float32


def test_grouped_axis_with_identity_blocks_matches_manual() -> None:
    model, spec = make("grouped")
    state = model.state_dict()
    p_in = torch.tensor([1, 0, 2, 3])  # swap within block 0 only
    matches = {"s1": match_from_unmerge(torch.cat([torch.eye(4), perm_matrix(p_in)]), 2, 1.0)}
    out = transform_state(spec, state, 1, matches)
    w = state["gconv.weight"]
    assert torch.equal(out["gconv.weight"][:3], w[:3, [1, 0]])  # group 0 rows see the swap
    assert torch.equal(out["gconv.weight"][3:], w[3:])


def test_dtypes_are_kept() -> None:
    model, spec = make("convres")
    model = model.double()
    state = model.state_dict()
    perms = random_perms(spec, 4)
    merged = apply_matches(spec, [state, permute_state(spec, state, perms)], true_matches(perms))
    assert merged["conv1.weight"].dtype == torch.float64
    assert merged["bn1.num_batches_tracked"].dtype == torch.int64
    assert torch.allclose(merged["conv3.weight"], state["conv3.weight"], atol=1e-12)


def test_bad_inputs_raise_mudsc_errors() -> None:
    (a, spec), (b, _) = make("mlp", 0), make("mlp", 1)
    sa, sb = a.state_dict(), b.state_dict()
    with pytest.raises(MudscError, match="h1"):
        apply_matches(spec, [sa, sb], {"h1": identity_match(8, 3)})
    with pytest.raises(MudscError, match="not a mergeable space"):
        apply_matches(spec, [sa, sb], {"nope": identity_match(8, 2)})
    with pytest.raises(MudscError, match="different tensors"):
        apply_matches(spec, [sa, {k: v for k, v in sb.items() if k != "fc3.bias"}], {})
    with pytest.raises(MudscError, match="fc1.weight"):
        apply_matches(spec, [{k: v for k, v in sa.items() if k != "fc1.weight"}] * 2, {})
    with pytest.raises(MudscError, match="no model 2"):
        transform_state(spec, sa, 2, {"h1": identity_match(8, 2)})
    overlap = (Member("fc1.weight", 0), Member("fc1.weight", 0, 2))
    bad = MergeSpec((Space("x", 4, producers=overlap),))
    with pytest.raises(MudscError, match="overlapping"):
        transform_state(bad, sa, 0, {"x": identity_match(4, 1)})
    too_long = MergeSpec((Space("x", 4, producers=(Member("fc1.weight", 0, 6),)),))
    with pytest.raises(MudscError, match="length 8"):
        transform_state(too_long, sa, 0, {"x": identity_match(4, 1)})
