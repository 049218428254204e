"""The torch.export capture route: the same spec as torch.fx where both trace, the
invariance property where only export does (nn.TransformerEncoder, Hugging Face models),
the spaces an expert expects, the route choice and the errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from archs import ARCHS, Branchy, TokenModel, TorchEncoder
from hf_tiny import bert, gpt2, vit
from invariance import assert_invariant, permute_model, randomise_
from test_spec import _ZOO, _zoo
from torch import Tensor, nn

from mudsc.errors import MudscError
from mudsc.merge import merge
from mudsc.models import names
from mudsc.spaces import MergeSpec, Space, Tap, trace, trace_model


def _zoo_first(name: str) -> tuple[nn.Module, Tensor]:
    configs, size = _ZOO.get(name, ([{"width": 1}], 16))
    return _zoo(name, configs[0], size)


@pytest.mark.parametrize("name", names())
def test_zoo_same_spec_on_both_routes_and_invariant(name: str) -> None:
    model, x = _zoo_first(name)
    fx_traced = trace_model(model, x, route="fx")
    exported = trace_model(model, x, route="export")
    assert (fx_traced.route, exported.route) == ("fx", "export")
    assert exported.spec.to_dict() == fx_traced.spec.to_dict()
    assert trace_model(model, x, verify=False).route == "fx"  # auto: fx when it sees all
    model.train()
    assert_invariant(model, exported.spec, x)


# Both routes agree on every space; warnings may differ where export sees inside a helper
# fx keeps opaque (``shuffled``: the structure fixes the same spaces without a warning) or
# names the op at ATen level (``rolled``: aten.roll.default).
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_archs_same_spaces_on_both_routes(arch: str) -> None:
    torch.manual_seed(0)
    model = randomise_(ARCHS[arch]().double(), torch.Generator().manual_seed(1))
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    a, b = trace(model, x, route="fx"), trace(model, x, route="export")
    assert a.to_dict()["spaces"] == b.to_dict()["spaces"]
    for mode in (False, True):
        model.train(mode)
        assert_invariant(model, b, x)


def test_token_model_same_spec_on_both_routes() -> None:
    model = randomise_(TokenModel().double(), torch.Generator().manual_seed(1))
    tokens = torch.randint(0, TokenModel.vocab, (3, 5))
    assert trace(model, tokens, route="export").to_dict() == trace(model, tokens).to_dict()


def test_exported_program_and_its_module_are_accepted() -> None:
    model, x = _zoo_first("vit")
    program = torch.export.export(model.eval(), (x,), strict=False)
    for given in (program, program.module()):
        traced = trace_model(given, x)
        assert traced.route == "export" and traced.spec.mergeable and not traced.spec.warnings
    with pytest.raises(MudscError, match="route='export'"):
        trace(program, x, route="fx")


# -- what an expert expects of the spaces ------------------------------------------------
def _space(spec: MergeSpec, tensor: str, axis: int = 0, start: int = 0) -> Space:
    """The space one producer member (tensor, axis, start) lies in."""
    for s in spec.spaces:
        if any((m.tensor, m.axis, m.start) == (tensor, axis, start) for m in s.producers):
            return s
    raise AssertionError(f"no space produced by {tensor} axis {axis} at {start}")


def _heads(qk: Space, v: Space, heads: int) -> None:
    """q/k in head groups tied to v's head order."""
    assert not qk.fixed and not v.fixed and qk is not v
    assert qk.groups == v.groups == heads
    assert qk.block_tie is not None and qk.block_tie == v.block_tie


def _checked(model: nn.Module, *inputs: Tensor) -> MergeSpec:
    """Auto route (export), no warnings, valid, invariant in eval mode."""
    model = randomise_(model.double().eval(), torch.Generator().manual_seed(1))
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    traced = trace_model(model, inputs)
    assert traced.route == "export"
    assert not traced.spec.warnings, traced.spec.warnings
    traced.spec.validate(model)
    assert_invariant(model, traced.spec, inputs)
    return traced.spec


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder(batch_first: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4) if batch_first else torch.randn(5, 2, 4)
    assert trace_model(TorchEncoder(batch_first), x, route="fx").spec.mergeable == ()  # opaque
    spec = _checked(TorchEncoder(batch_first), x)
    for i in range(2):
        p = f"encoder.layers.{i}"
        w = f"{p}.self_attn.in_proj_weight"
        _heads(_space(spec, w, 0, 0), _space(spec, w, 0, 16), 2)
        assert _space(spec, w, 0, 8) is _space(spec, w, 0, 0)  # k with q
        assert not _space(spec, f"{p}.linear1.weight").fixed
    residual = _space(spec, "encoder.layers.0.self_attn.out_proj.weight")
    assert not residual.fixed and residual is _space(spec, "encoder.layers.1.norm2.weight")
    assert residual is _space(spec, "proj.weight")
    x = torch.randn(2, 5, 8) if batch_first else torch.randn(5, 2, 8)
    alone = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=batch_first), 1,
        enable_nested_tensor=False,
    )  # fmt: skip
    assert _space(_checked(alone, x), "layers.0.norm2.weight").fixed  # the output


class _RawHidden(nn.Module):
    """A custom layer with raw parameters and F.linear: no module rule names a tap."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 8))
        self.b = nn.Parameter(torch.randn(12))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(nn.functional.linear(x, self.w, self.b))


class _Functional(nn.Module):
    """The hidden space is produced and consumed by functional ops only."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.hidden, self.head = nn.Linear(4, 8), _RawHidden(), nn.Linear(6, 3)
        self.down = nn.Parameter(torch.randn(6, 12))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(nn.functional.linear(self.hidden(self.proj(x)), self.down))


@pytest.mark.parametrize("route", ["fx", "export"])
def test_space_of_functional_ops_is_tapped_at_its_module_output(route: str) -> None:
    model = randomise_(_Functional().double(), torch.Generator().manual_seed(1))
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    spec = trace(model, x, route=route)
    hidden = _space(spec, "hidden.w")
    assert hidden.taps == (Tap("hidden", "output", 1),)
    assert trace(model, x, route="fx").to_dict() == spec.to_dict()
    b = _Functional().double()
    b.load_state_dict(permute_model(model, spec, torch.Generator().manual_seed(5)))
    merged = merge([model, b], [x], "zipit", repair="none")
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x))


def test_partial_merge_cuts_the_export_graph() -> None:
    """A permuted copy merged up to a layer: the trunk is exact, the heads are the sources'."""
    torch.manual_seed(0)
    a = TorchEncoder(batch_first=True).eval()
    data = [torch.randn(4, 5, 4) for _ in range(2)]
    b = TorchEncoder(batch_first=True).eval()
    b.load_state_dict(permute_model(a, trace(a, data[0]), torch.Generator().manual_seed(5)))
    merged = merge([a, b], data, "zipit", repair="none", stop_at="encoder.layers.0")
    with torch.no_grad():
        assert torch.allclose(merged(data[0]), a(data[0]), atol=1e-5)


transformers = pytest.importorskip("transformers")


_TOKENS = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(0))
_IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("make", "prefix", "head"), [
    (lambda: bert(transformers.BertModel), "", False),
    (lambda: bert(transformers.BertForSequenceClassification), "bert.", True),
])  # fmt: skip
def test_bert(make: Callable[[], nn.Module], prefix: str, head: bool) -> None:
    spec = _checked(make(), _TOKENS)
    layer = f"{prefix}encoder.layer.0"
    attn = f"{layer}.attention.self"
    _heads(_space(spec, f"{attn}.query.weight"), _space(spec, f"{attn}.value.weight"), 2)
    assert _space(spec, f"{attn}.key.weight") is _space(spec, f"{attn}.query.weight")
    assert not _space(spec, f"{layer}.intermediate.dense.weight").fixed
    residual = _space(spec, f"{prefix}embeddings.word_embeddings.weight", axis=1)
    assert residual.fixed is not head  # last_hidden_state is BertModel's output


@pytest.mark.parametrize(("make", "prefix", "head"), [
    (lambda: vit(transformers.ViTModel), "", False),
    (lambda: vit(transformers.ViTForImageClassification), "vit.", True),
])  # fmt: skip
def test_vit(make: Callable[[], nn.Module], prefix: str, head: bool) -> None:
    model = make()
    spec = _checked(model, _IMAGES)
    attn = next(n for n, m in model.named_modules() if n.endswith("0.attention"))
    q, k, v = (next(f"{attn}.{n}.weight" for n in names_ if f"{attn}.{n}.weight" in
                    model.state_dict()) for names_ in
               (("q_proj", "attention.query"), ("k_proj", "attention.key"),
                ("v_proj", "attention.value")))  # fmt: skip
    _heads(_space(spec, q), _space(spec, v), 2)
    assert _space(spec, k) is _space(spec, q)
    fc1 = next(n for n in model.state_dict() if n.endswith("0.mlp.fc1.weight")
               or n.endswith("0.intermediate.dense.weight"))  # fmt: skip
    assert not _space(spec, fc1).fixed
    patch = f"{prefix}embeddings.patch_embeddings.projection.weight"
    assert _space(spec, patch).fixed is not head  # the residual stream


@pytest.mark.parametrize(("cls", "prefix", "head"), [
    ("GPT2Model", "", False), ("GPT2LMHeadModel", "transformer.", True),
])  # fmt: skip
def test_gpt2_fused_qkv_on_the_transposed_conv1d(cls: str, prefix: str, head: bool) -> None:
    spec = _checked(gpt2(getattr(transformers, cls)), _TOKENS)
    w = f"{prefix}h.0.attn.c_attn.weight"  # (in, 3 * embed): q | k | v columns
    _heads(_space(spec, w, 1, 0), _space(spec, w, 1, 16), 2)
    assert _space(spec, w, 1, 8) is _space(spec, w, 1, 0)
    hidden = _space(spec, f"{prefix}h.0.mlp.c_fc.weight", 1)
    assert not hidden.fixed and hidden.taps  # observed at the Conv1D's output
    assert _space(spec, f"{prefix}wte.weight", 1).fixed is not head


def test_resnet_batchnorm_statistics() -> None:
    config = transformers.ResNetConfig(
        embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], layer_type="basic", num_labels=3
    )
    spec = _checked(transformers.ResNetForImageClassification(config), _IMAGES)
    stem = _space(spec, "resnet.embedder.embedder.convolution.weight")
    assert not stem.fixed  # the first stage's residual stream
    ignored = {m.tensor for m in stem.ignored}
    assert "resnet.embedder.embedder.normalization.running_mean" in ignored
    conv = "resnet.encoder.stages.1.layers.0.layer.0.convolution.weight"
    assert not _space(spec, conv).fixed and _space(spec, conv).taps


def test_convnext() -> None:
    config = transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[4, 8], depths=[1, 1], num_labels=3
    )
    spec = _checked(transformers.ConvNextForImageClassification(config), _IMAGES)
    layer = "convnext.encoder.stages.0.layers.0"
    assert not _space(spec, f"{layer}.pwconv1.weight").fixed
    residual = _space(spec, "convnext.embeddings.patch_embeddings.weight")
    assert not residual.fixed and residual is _space(spec, f"{layer}.pwconv2.weight")


def test_errors_name_both_routes() -> None:
    with pytest.raises(MudscError) as info:
        trace(Branchy(), torch.randn(2, 3, 8, 8), route="export")
    assert "torch.export cannot trace Branchy" in str(info.value)
    with pytest.raises(MudscError, match="unknown capture route"):
        trace(Branchy(), torch.randn(2, 3, 8, 8), route="jit")  # type: ignore[arg-type]
