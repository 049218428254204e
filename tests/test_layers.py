"""Layer types: one registration carries a layer's tracing rule, renormalisation kind and
memory-layout preference, and tracing, renormalisation and the merge all read it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from invariance import assert_invariant, randomise_
from torch import Tensor, nn

from mudsc.layers import (
    LayerTypes,
    has_batchnorm,
    layer_type,
    prefers_channels_last,
    register_layer,
)
from mudsc.renorm import apply_repair, repair_layers, reset_batchnorm, resolve_mode
from mudsc.solvers.match import identity_match
from mudsc.spaces import trace, trace_model


def test_sync_batchnorm_is_a_batchnorm_everywhere() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    assert layer_type(model[1]).norm == "batchnorm"
    assert has_batchnorm(model)
    assert resolve_mode("auto", model) == "bn"
    batches = [torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    reset_batchnorm(model, batches, "cpu")
    inputs = torch.cat([model[0](x) for x in batches]).detach()
    torch.testing.assert_close(model[1].running_mean, inputs.mean((0, 2, 3)))
    assert not model.training


def test_the_zoo_layers_answer_as_the_old_tables_did() -> None:
    assert layer_type(nn.Linear(2, 3)).channel_axis == "last"
    assert layer_type(nn.LayerNorm(3)).channel_axis == "last"
    assert layer_type(nn.Conv2d(2, 3, 1)).channel_axis == "first"
    assert layer_type(nn.GroupNorm(1, 3)).channel_axis == "first"
    # reset by default; REPAIR, when asked for on a BatchNorm network, folds into it
    assert layer_type(nn.BatchNorm2d(3)).channel_axis == "first"
    assert layer_type(nn.RMSNorm(3)).channel_axis is None  # no bias to fold into
    assert not has_batchnorm(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)))
    assert prefers_channels_last(nn.Sequential(nn.Conv2d(2, 3, 1)))
    assert not prefers_channels_last(nn.Sequential(nn.Conv1d(2, 3, 1), nn.Linear(3, 2)))


class _KeepsForward(nn.Linear):
    pass


class _OwnForward(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).flip(-1)


def test_a_subclass_is_its_base_layer_type_only_if_it_keeps_forward() -> None:
    assert layer_type(_KeepsForward(2, 3)) is layer_type(nn.Linear(2, 3))
    assert layer_type(_OwnForward(2, 3)) is None


class ScaledLinear(nn.Module):
    """A user layer: a linear map with a learned output scale (a leaf with its own rule)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out))
        self.scale = nn.Parameter(torch.rand(n_out) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) * self.scale


@register_layer(ScaledLinear, channel_axis="last")
def _scaled_linear(ctx):
    x = ctx.tensor(0)
    ctx.member(f"{ctx.path}.weight", 1, x.dims[-1], "consumer")
    ctx.mix(x, -1)
    ctx.tap("input", 0, x.ndim - 1, x.dims[-1], "consumer")
    out = ctx.fresh(ctx.module.weight.shape[0])
    for tensor, axis in (("weight", 0), ("bias", 0), ("scale", 0)):
        ctx.member(f"{ctx.path}.{tensor}", axis, out, "producer")
    return ctx.record(type(x)(x.dims[:-1] + (out,), ctx.out_shape()))


def test_a_user_layer_type_is_traced_and_repaired_from_one_registration() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(4, 6), nn.ReLU(), ScaledLinear(6, 3)).double()
    randomise_(model, torch.Generator().manual_seed(1))
    x = torch.randn(8, 4, dtype=torch.float64)
    traced = trace_model(model, x)
    assert [n.op for n in traced.nodes].count("call_module") == 3  # a leaf, by its rule
    spec = traced.spec
    assert {m.tensor for m in spec.space("0").producers} == {"0.weight", "0.bias", "0.scale"}
    assert_invariant(model, spec, x)
    assert resolve_mode("auto", model) == "repair"
    assert set(repair_layers(model, spec)) == {"0"}
    sources = [model, randomise_(type(model)(*model).double(), torch.Generator().manual_seed(2))]
    merged = randomise_(type(model)(*model).double(), torch.Generator().manual_seed(3))
    matches = {s.name: identity_match(s.size, 2) for s in spec.mergeable}
    assert apply_repair(merged, sources, spec, matches, [x], "cpu") == 1


def test_a_registry_object_is_separate_from_the_default() -> None:
    mine = LayerTypes()
    register_layer(nn.Tanh, norm="batchnorm", layers=mine)(lambda ctx: ctx.tensor(0))
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    assert has_batchnorm(model, mine) and not has_batchnorm(model)
    assert layer_type(nn.Tanh()).norm is None
    assert not trace(model, torch.randn(2, 2)).space("0").fixed  # default Tanh rule kept
