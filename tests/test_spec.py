"""Automatic merge spaces: the invariance property on the zoo and on test architectures,
space names and structure, warnings for unsupported ops, errors, JSON and validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from archs import ARCHS, Branchy, MHANet, TokenModel, _BranchyInner
from invariance import assert_invariant, randomise_
from torch import Tensor, nn

from mudsc.errors import MudscError
from mudsc.models import create, names
from mudsc.spaces import MergeSpec, Rules, register_module_rule, trace
from mudsc.spaces.rules import RULES

# Small configurations: (kwargs at width A, kwargs at width B), image size.
_ZOO = {
    "mlp": ([{"width": 0.03}, {"width": 0.06}], 8),
    "resnet20": ([{"width": 1}, {"width": 2}], 8),
    "resnet20-gn": ([{"width": 1}, {"width": 2}], 8),
    "resnet50": ([{"width": 0.125}, {"width": 0.25}], 8),
    "vgg11": ([{"width": 0.0625}, {"width": 0.125}], 8),
    "vgg11-bn": ([{"width": 0.0625}, {"width": 0.125}], 8),
    "vit": ([{"width": 0.25, "depth": 2}, {"width": 0.5, "depth": 2}], 16),
}


def _zoo_cases() -> list:
    cases = []
    for name in names():
        configs, size = _ZOO.get(name, ([{"width": 1}, {"width": 2}], 16))
        for i, cfg in enumerate(configs):
            cases.append(pytest.param(name, cfg, size, id=f"{name}-w{i}"))
    return cases


def _zoo(name: str, cfg: dict, size: int) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    extra = {"patch_size": 4} if name == "vit" else {}
    model = create(name, in_channels=3, image_size=size, embed_dim=6, **cfg, **extra).double()
    randomise_(model, torch.Generator().manual_seed(1))
    return model, torch.randn(4, 3, size, size, dtype=torch.float64)


@pytest.mark.parametrize(("name", "cfg", "size"), _zoo_cases())
def test_zoo_invariant_eval_and_train(name: str, cfg: dict, size: int) -> None:
    model, x = _zoo(name, cfg, size)
    spec = trace(model, x)
    assert spec.mergeable, "no mergeable space found"
    assert not spec.warnings, spec.warnings
    spec.validate(model)
    model.eval()
    assert_invariant(model, spec, x)
    model.train()  # BatchNorm on batch statistics: same batch for both models
    assert_invariant(model, spec, x, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_archs_invariant(arch: str) -> None:
    torch.manual_seed(0)
    model = randomise_(ARCHS[arch]().double(), torch.Generator().manual_seed(1))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    spec = trace(model, x)
    spec.validate(model)
    assert spec.mergeable
    for mode in (False, True):
        model.train(mode)
        assert_invariant(model, spec, x)


def test_token_model_embedding_rmsnorm_and_shared_linear() -> None:
    model = randomise_(TokenModel().double(), torch.Generator().manual_seed(1))
    tokens = torch.randint(0, TokenModel.vocab, (3, 5))
    spec = trace(model, tokens)
    assert not spec.warnings
    res = spec.space("res")
    assert {("emb.weight", 1), ("scale", 0)} <= {(m.tensor, m.axis) for m in res.producers}
    shared = [
        s
        for s in spec.mergeable
        if ("shared.weight", 0) in {(m.tensor, m.axis) for m in s.producers}
    ]
    assert len(shared) == 1 and ("shared.weight", 1) in {
        (m.tensor, m.axis) for m in shared[0].consumers
    }  # one Linear applied twice: its output and input axes are one space
    assert_invariant(model.eval(), spec, tokens)


def _spec(name: str, **cfg: object) -> tuple[MergeSpec, nn.Module]:
    size = 16 if name == "vit" else 8
    model, x = _zoo(name, cfg, size)
    return trace(model, x), model


def test_resnet20_spaces() -> None:
    spec, _ = _spec("resnet20", width=1)
    free = [s.name for s in spec.mergeable]
    inner = [f"layer{i}.{j}.conv1" for i in (1, 2, 3) for j in range(3)]
    assert sorted(free) == sorted([f"layer{i}.res" for i in (1, 2, 3)] + inner)
    assert [s.name for s in spec.spaces][:3] == ["input", "layer1.res", "layer1.0.conv1"]
    assert spec.spaces[-1].name == "output" and spec.spaces[-1].fixed
    assert spec.space("input").fixed
    stage2 = spec.space("layer2.res")
    assert stage2.size == 32
    producers = {m.tensor for m in stage2.producers}
    assert {"layer2.0.bn2.weight", "layer2.0.shortcut.1.bias", "layer2.2.bn2.bias"} <= producers
    consumers = {m.tensor for m in stage2.consumers}
    assert {"layer2.1.conv1.weight", "layer3.0.shortcut.0.weight"} <= consumers
    assert {(m.tensor, m.axis) for m in stage2.ignored} >= {
        ("layer2.0.bn2.running_mean", 0),
        ("layer2.0.bn2.running_var", 0),
    }
    assert not any("running" in m.tensor for m in stage2.producers + stage2.consumers)
    taps = {t.module for t in stage2.taps}
    assert {"layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1"} <= taps
    assert all(t.side == "input" and t.axis == 1 for t in stage2.taps)


def test_vit_spaces_heads_and_key_bias() -> None:
    spec, model = _spec("vit", width=0.25, depth=2)
    dim, heads = 16, model.config["heads"]
    free = [s.name for s in spec.mergeable]
    expect = ["blocks.res"] + [
        f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qk", "attn.v", "mlp.fc1")
    ]
    assert free == expect
    res = spec.space("blocks.res")
    assert ("cls_token", 2) in {(m.tensor, m.axis) for m in res.producers}
    assert ("pos_embed", 2) in {(m.tensor, m.axis) for m in res.producers}
    qk, v = spec.space("blocks.0.attn.qk"), spec.space("blocks.0.attn.v")
    assert (qk.groups, v.groups) == (heads, heads)
    assert qk.block_tie == v.block_tie == "blocks.0.attn.heads"
    assert not qk.consumers
    rows = {(m.tensor, m.start) for m in qk.producers}
    # The key bias is invisible to the invariance check (softmax cancels it): assert it.
    assert ("blocks.0.attn.qkv.bias", dim) in rows
    assert ("blocks.0.attn.qkv.weight", 0) in rows and ("blocks.0.attn.qkv.weight", dim) in rows
    assert {(m.tensor, m.start) for m in v.producers} >= {("blocks.0.attn.qkv.bias", 2 * dim)}
    assert [(m.tensor, m.axis) for m in v.consumers] == [("blocks.0.attn.proj.weight", 1)]
    assert {(t.module, t.side, t.start) for t in qk.taps} == {
        ("blocks.0.attn.qkv", "output", 0),
        ("blocks.0.attn.qkv", "output", dim),
    }
    assert spec.tie_groups()["blocks.0.attn.heads"] == ("blocks.0.attn.qk", "blocks.0.attn.v")


def test_mha_spaces() -> None:
    model = MHANet()
    spec = trace(model, torch.randn(2, 3, 8, 8))
    qk, v = spec.space("attn.qk"), spec.space("attn.v")
    assert qk.groups == v.groups == 4 and qk.block_tie == v.block_tie == "attn.heads"
    rows = {(m.tensor, m.start) for m in qk.producers}
    assert {("attn.in_proj_bias", 16), ("attn.in_proj_weight", 16), ("attn.bias_k", 0)} <= rows
    assert ("attn.out_proj.weight", 1) in {(m.tensor, m.axis) for m in v.consumers}
    taps = {(t.arg, t.project_weight, t.project_start) for t in qk.taps}
    assert taps == {(0, "attn.in_proj_weight", 0), (1, "attn.in_proj_weight", 16)}


def test_structure_of_concat_depthwise_grouped_mixer() -> None:
    specs = {
        a: trace(ARCHS[a](), torch.randn(2, 3, 8, 8))
        for a in ("densenet", "mobilenet", "grouped", "mixer")
    }
    dense = specs["densenet"]
    starts = {(m.tensor, m.start) for m in dense.space("conv_a").consumers}
    assert starts == {("conv_b.weight", 6), ("head.weight", 6)}
    mobile = specs["mobilenet"]
    assert {m.tensor for m in mobile.space("stem.0").producers} >= {"dw.0.weight", "dw.1.bias"}
    flat = mobile.space("dw2").consumers
    assert [(m.tensor, m.inner) for m in flat] == [("head.weight", 4)]
    assert mobile.space("dw2").groups == 6 and mobile.space("pw.0").block_tie == "dw2.groups"
    grouped = specs["grouped"]
    assert {s.groups for s in grouped.mergeable} == {4}
    assert len(grouped.tie_groups()) == 1
    assert [m.per_group for m in grouped.space("g1").consumers] == [True]
    mixer = specs["mixer"]
    token_axis = next(
        s
        for s in mixer.spaces
        if ("token_fc1.weight", 1) in {(m.tensor, m.axis) for m in s.consumers}
    )
    assert token_axis.fixed and token_axis.size == 4
    assert not mixer.space("token_fc1").fixed and mixer.space("token_fc1").size == 6


def test_taps_fit_the_tapped_tensors() -> None:
    model = create("resnet20", in_channels=3, image_size=8, embed_dim=6)
    spec = trace(model, torch.randn(2, 3, 8, 8))
    seen: dict[tuple[str, str], list[Tensor]] = {}
    handles = []
    for name, module in model.named_modules():

        def hook(m: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
            seen[(name, "input")] = list(args)
            seen[(name, "output")] = [out]

        handles.append(module.register_forward_hook(hook))
    model(torch.randn(2, 3, 8, 8))
    for h in handles:
        h.remove()
    for s in spec.mergeable:
        assert s.taps, s.name
        for t in s.taps:
            x = seen[(t.module, t.side)][t.arg]
            assert x.shape[t.axis] >= t.start + s.size * t.inner


def test_negative_broken_specs_fail_the_check() -> None:
    model, x = _zoo("resnet20", {"width": 1}, 8)
    model.eval()
    spec = trace(model, x)
    res = spec.space("layer1.res")
    broken = dataclasses.replace(res, consumers=res.consumers[1:])
    bad = MergeSpec(tuple(broken if s is res else s for s in spec.spaces))
    with pytest.raises(AssertionError):
        assert_invariant(model, bad, x)
    vit, xv = _zoo("vit", {"width": 0.25, "depth": 1}, 16)
    spec = trace(vit, xv)
    split = tuple(
        dataclasses.replace(s, groups=1, block_tie=None) if s.name.endswith("qk") else s
        for s in spec.spaces
    )
    with pytest.raises(AssertionError):
        assert_invariant(vit, MergeSpec(split), xv)


@pytest.mark.parametrize(("arch", "op", "fixed"), [
    ("rolled", "torch.roll", "conv2"), ("shuffled", "channel_shuffle", "conv1"),
])  # fmt: skip
def test_unsupported_op_warns_and_fixes(arch: str, op: str, fixed: str) -> None:
    model = randomise_(ARCHS[arch]().double(), torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    spec = trace(model, x)
    assert len(spec.warnings) == 1 and op in spec.warnings[0] and "unsupported" in spec.warnings[0]
    assert f"spaces fixed: {fixed}" in spec.warnings[0]
    assert spec.space(fixed).fixed
    assert spec.mergeable  # the spaces away from the op stay mergeable
    assert_invariant(model.eval(), spec, x)


def test_incompatible_groups_are_fixed_with_a_warning() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 12, 1), nn.Conv2d(12, 12, 1, groups=2), nn.ReLU(),
        nn.Conv2d(12, 12, 1, groups=3), nn.Conv2d(12, 4, 1),
    ).double()  # fmt: skip
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    spec = trace(model, x)
    assert any("incompatible group counts [2, 3]" in w for w in spec.warnings)
    assert_invariant(model, spec, x)


def test_untraceable_model_raises_a_clear_error() -> None:
    with pytest.raises(MudscError) as info:
        trace(Branchy(), torch.randn(2, 3, 8, 8))
    text = str(info.value)
    assert "torch.fx" in text and "'inner' (_BranchyInner)" in text and "TraceError" in text
    assert "torch.export cannot trace Branchy" in text  # both routes' reasons
    assert "control flow" in text and "MergeSpec.from_json" in text and "mudsc.trace(" in text
    with pytest.raises(MudscError, match="torch.fx cannot trace") as info:
        trace(Branchy(), torch.randn(2, 3, 8, 8), route="fx")
    assert "torch.export" not in str(info.value).split(".  ")[0]


def _branchy_inner_rule(ctx):
    """Rows of ``fc`` produce the output (its sign flip keeps their order)."""
    x = ctx.tensor(0)
    out = ctx.fresh(ctx.module.fc.out_features)
    for tensor in ("fc.weight", "fc.bias"):
        ctx.member(f"{ctx.path}.{tensor}", 0, out, "producer")
    return ctx.record(type(x)((x.dims[0], out), ctx.out_shape()))


def test_rules_passed_for_one_call_leave_the_default_registry_alone() -> None:
    """Branchy's inner module branches on tensor values: fx cannot follow it, but a rule
    passed for one call makes it a leaf."""
    extra = Rules()
    extra.module(_BranchyInner)(_branchy_inner_rule)
    before = (dict(RULES.functions), dict(RULES.methods), list(RULES.layers))
    torch.manual_seed(0)
    model = randomise_(Branchy().double(), torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    spec = trace(model, x, rules=extra)
    assert [s.name for s in spec.mergeable] == ["inner.fc"] and not spec.warnings
    assert_invariant(model.eval(), spec, x)
    assert (dict(RULES.functions), dict(RULES.methods), list(RULES.layers)) == before
    assert RULES.module_rule(model.inner) is None
    with pytest.raises(MudscError, match="cannot trace"):
        trace(model, x)


def test_bad_example_input_raises_a_clear_error() -> None:
    with pytest.raises(MudscError, match="example input"):
        trace(create("mlp", image_size=8), torch.randn(2, 3, 5, 5))


class _Flip(nn.Module):
    """Reverses channels: order-sensitive."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flip(1)


class _Gain(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain.view(1, -1, 1, 1)


@register_module_rule(_Flip)
def _wrong_flip_rule(ctx):  # deliberately wrong: claims the op keeps channel order
    return ctx.tensor(0)


@register_module_rule(_Gain)
def _gain_rule(ctx):
    x = ctx.tensor(0)
    ctx.member(f"{ctx.path}.gain", 0, x.dims[1], "producer")
    return x


def test_user_rules_and_the_numeric_safety_net() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 6, 1), _Gain(6), nn.ReLU(), nn.Conv2d(6, 6, 1), _Flip(), nn.Conv2d(6, 5, 1)
    ).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    unchecked = trace(model, x, verify=False)
    assert ("1.gain", 0) in {(m.tensor, m.axis) for m in unchecked.space("0").producers}
    with pytest.raises(AssertionError):  # the wrong rule makes a wrong spec ...
        assert_invariant(model, unchecked, x)
    spec = trace(model, x)  # ... which verification catches, fixes and reports
    assert spec.space("3").fixed and not spec.space("0").fixed
    assert any("changed the model's output" in w and "3" in w for w in spec.warnings)
    assert_invariant(model, spec, x)


def test_json_round_trip_and_validate() -> None:
    for name in ("resnet20", "vit"):
        spec, model = _spec(name, width=1 if name == "resnet20" else 0.25)
        again = MergeSpec.from_json(spec.to_json())
        assert again == spec
        again.validate(model)
    mha = trace(MHANet(), torch.randn(2, 3, 8, 8))
    assert MergeSpec.from_json(mha.to_json()) == mha
    spec, model = _spec("resnet20", width=1)
    s = spec.space("layer1.0.conv1")
    renamed = dataclasses.replace(s.producers[0], tensor="layer1.0.conv9.weight")
    bad = dataclasses.replace(s, producers=(renamed,) + s.producers[1:])
    with pytest.raises(MudscError, match="no tensor 'layer1.0.conv9.weight'"):
        MergeSpec(tuple(bad if x is s else x for x in spec.spaces)).validate(model)
    bigger = dataclasses.replace(s, size=s.size + 1)
    with pytest.raises(MudscError, match="axis has length"):
        MergeSpec(tuple(bigger if x is s else x for x in spec.spaces)).validate(model)
