"""The built-in layer types: standard ``torch.nn`` modules (traced as leaves).

One registration per layer type (:func:`mudsc.layers.register_layer`) carries its tracing
rule with its normalisation kind, the output axis REPAIR corrects and its memory-layout
preference.
"""

from __future__ import annotations

import sys

from torch import nn

from mudsc.layers import LAYERS, register_layer
from mudsc.spaces.atoms import Unsplittable
from mudsc.spaces.context import Ctx, Meta, TDims
from mudsc.spaces.layouts import pad, reshape, spatial_tail

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip
_POOLS = {
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2,
    nn.ReflectionPad1d: 1, nn.ReflectionPad2d: 2,
    nn.ReflectionPad3d: 3, nn.ReplicationPad1d: 1, nn.ReplicationPad2d: 2,
    nn.ReplicationPad3d: 3,
}  # fmt: skip


def _name(ctx: Ctx, tensor: str) -> str:
    return f"{ctx.path}.{tensor}" if ctx.path else tensor


def _has(ctx: Ctx, tensor: str) -> bool:
    return getattr(ctx.module, tensor, None) is not None


def _same(ctx: Ctx) -> TDims:
    x = ctx.tensor(0)
    return ctx.record(TDims(x.dims, ctx.out_shape()))


register_layer(*_ELEMENTWISE)(_same)


@register_layer(nn.PReLU)
def _prelu(ctx: Ctx) -> TDims:
    x = ctx.tensor(0)
    if ctx.module.num_parameters > 1:
        ctx.member(_name(ctx, "weight"), 0, x.dims[1 if x.ndim > 1 else 0], "producer")
    return _same(ctx)


@register_layer(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def _softmax(ctx: Ctx) -> TDims:
    x = ctx.tensor(0)
    if ctx.module.dim is None:
        raise Unsplittable("softmax without an explicit dim")
    ctx.mix(x, ctx.module.dim)
    return _same(ctx)


@register_layer(nn.Flatten, nn.Unflatten)
def _flatten(ctx: Ctx) -> TDims:
    return reshape(ctx, ctx.tensor(0), ctx.out_shape())  # type: ignore[return-value]


@register_layer(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                      nn.ConstantPad3d)  # fmt: skip
def _constant_pad(ctx: Ctx) -> TDims:
    return pad(ctx, ctx.tensor(0), list(ctx.module.padding), ctx.out_shape())


@register_layer(*_POOLS)
def _pool(ctx: Ctx) -> TDims:
    return spatial_tail(ctx, ctx.tensor(0), _POOLS[type(ctx.module)], ctx.out_shape())


@register_layer(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def _upsample(ctx: Ctx) -> TDims:
    x = ctx.tensor(0)
    return spatial_tail(ctx, x, x.ndim - 2, ctx.out_shape())


@register_layer(nn.Linear, channel_axis="last")
def _linear(ctx: Ctx) -> TDims:
    m, x = ctx.module, ctx.tensor(0)
    inp = x.dims[-1]
    ctx.member(_name(ctx, "weight"), 1, inp, "consumer")
    ctx.mix(x, -1)
    ctx.tap("input", 0, x.ndim - 1, inp, "consumer")
    out = ctx.fresh(m.out_features)
    ctx.member(_name(ctx, "weight"), 0, out, "producer")
    if _has(ctx, "bias"):
        ctx.member(_name(ctx, "bias"), 0, out, "producer")
    ctx.record(TDims((out, inp), tuple(m.weight.shape)))
    y = ctx.record(TDims(x.dims[:-1] + (out,), ctx.out_shape()))
    ctx.tap("output", 0, y.ndim - 1, out, "producer")
    return y


def _convolution(ctx: Ctx, transposed: bool) -> TDims:
    """A convolution module; the weight is (out, in/groups, *k), or (in, out/groups, *k)
    when transposed: its second axis holds one group's units."""
    m, x = ctx.module, ctx.tensor(0)
    ch = x.ndim - len(m.kernel_size) - 1
    cin, shape = x.dims[ch], ctx.out_shape()
    for d in x.dims[ch + 1 :]:
        ctx.atoms.fix_layout(d, "convolved spatial axis")
    spatial = tuple(ctx.fresh(n, spatial=True) for n in shape[ch + 1 :])
    weight = _name(ctx, "weight")
    w_in, w_out = (0, 1) if transposed else (1, 0)
    grouped = m.groups > 1
    if grouped and m.groups == m.in_channels == m.out_channels:
        out = cin  # depthwise: each channel is filtered on its own
        w_out = 0
    else:
        out = ctx.fresh(m.out_channels)
        ctx.member(weight, w_in, cin, "consumer", per_group=grouped and w_in == 1)
        if grouped:
            ctx.groups(cin, m.groups, ctx.path)
            ctx.groups(out, m.groups, ctx.path)
            ctx.tie(cin, out, f"{ctx.path}.groups")
        ctx.mix(x, ch)
        ctx.tap("input", 0, ch, cin, "consumer")
    ctx.member(weight, w_out, out, "producer", per_group=grouped and w_out == 1)
    if _has(ctx, "bias"):
        ctx.member(_name(ctx, "bias"), 0, out, "producer")
    y = ctx.record(TDims(x.dims[:ch] + (out,) + spatial, shape))
    ctx.tap("output", 0, ch, out, "producer")
    return y


@register_layer(nn.Conv1d, nn.Conv3d, channel_axis="first")
def _conv(ctx: Ctx) -> TDims:
    return _convolution(ctx, transposed=False)


# oneDNN 2-d convolutions run markedly faster on NHWC (measured 1.7x for ResNet-20 x8)
register_layer(nn.Conv2d, channel_axis="first", channels_last=True)(_conv)


@register_layer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, channel_axis="first")
def _conv_transpose(ctx: Ctx) -> TDims:
    return _convolution(ctx, transposed=True)


# channel_axis: in eval mode a BatchNorm is a per-channel affine map, so REPAIR (asked for
# on a BatchNorm network) corrects it; without it REPAIR found nothing to fold into there.
@register_layer(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, norm="batchnorm",
    channel_axis="first",
)  # fmt: skip
def _batchnorm(ctx: Ctx) -> TDims:
    return _per_channel(ctx, 1)


@register_layer(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, norm="affine")
def _instancenorm(ctx: Ctx) -> TDims:
    k = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}[type(ctx.module)]
    return _per_channel(ctx, ctx.tensor(0).ndim - k - 1)


def _per_channel(ctx: Ctx, ch: int) -> TDims:
    """Affine per-channel norms: weight/bias produce, running statistics are ignored."""
    x = ctx.tensor(0)
    for tensor in ("weight", "bias"):
        if _has(ctx, tensor):
            ctx.member(_name(ctx, tensor), 0, x.dims[ch], "producer")
    for tensor in ("running_mean", "running_var"):
        if _has(ctx, tensor):
            ctx.member(_name(ctx, tensor), 0, x.dims[ch], "ignored")
    return _same(ctx)


@register_layer(nn.GroupNorm, norm="affine", channel_axis="first")
def _groupnorm(ctx: Ctx) -> TDims:
    x = ctx.tensor(0)
    ctx.mix(x, 1)
    ctx.groups(x.dims[1], ctx.module.num_groups, ctx.path)
    for tensor in ("weight", "bias"):
        if _has(ctx, tensor):
            ctx.member(_name(ctx, tensor), 0, x.dims[1], "producer")
    return _same(ctx)


@register_layer(nn.LayerNorm, norm="affine", channel_axis="last")
@register_layer(nn.RMSNorm, norm="affine")  # no bias: REPAIR cannot fold into it
def _layernorm(ctx: Ctx) -> TDims:
    x = ctx.tensor(0)
    k = len(ctx.module.normalized_shape)
    for i in range(k):
        axis = x.ndim - k + i
        ctx.mix(x, axis)
        for tensor in ("weight", "bias"):
            if _has(ctx, tensor):
                ctx.member(_name(ctx, tensor), i, x.dims[axis], "producer")
    return _same(ctx)


@register_layer(nn.Embedding)
def _embedding(ctx: Ctx) -> TDims:
    idx = ctx.tensor(0)
    out = ctx.fresh(ctx.module.embedding_dim)
    ctx.member(_name(ctx, "weight"), 1, out, "producer")
    return ctx.record(TDims(idx.dims + (out,), ctx.out_shape()))


@register_layer(nn.MultiheadAttention)
def _mha(ctx: Ctx) -> tuple:
    """q/k and v spaces grouped by heads with one head order; inputs share the in-proj."""
    m = ctx.module
    q, k, v = (ctx.tensor(i) or ctx.tensor(n) for i, n in enumerate(("query", "key", "value")))
    if q is None or k is None or v is None:
        raise Unsplittable("attention inputs not found")
    # Token and batch axes (and masks) are treated as fixed: the leaf hides how they mix.
    for t in (q, k, v, *(ctx.tensor(n) for n in ("key_padding_mask", "attn_mask"))):
        if t is not None:
            for d in t.dims[:-1] if t in (q, k, v) else t.dims:
                ctx.atoms.fix_layout(d, "attention tokens")
    e, heads = m.embed_dim, m.num_heads
    qk, vv = ctx.fresh(e), ctx.fresh(e)
    for t in (q, k, v):
        ctx.mix(t, -1)
    if m._qkv_same_embed_dim:
        ctx.union(q.dims[-1], k.dims[-1])
        ctx.union(q.dims[-1], v.dims[-1])
        ctx.member(_name(ctx, "in_proj_weight"), 1, q.dims[-1], "consumer")
        ctx.member(_name(ctx, "in_proj_weight"), 0, qk + qk + vv, "producer")
        weights = [_name(ctx, "in_proj_weight")] * 3
        starts = [0, e, 2 * e]
    else:
        weights = [_name(ctx, f"{p}_proj_weight") for p in "qkv"]
        for w, t, rows in zip(weights, (q, k, v), (qk, qk, vv), strict=True):
            ctx.member(w, 1, t.dims[-1], "consumer")
            ctx.member(w, 0, rows, "producer")
        starts = [0, 0, 0]
    bias = _name(ctx, "in_proj_bias") if _has(ctx, "in_proj_bias") else None
    if bias:
        ctx.member(bias, 0, qk + qk + vv, "producer")
    if _has(ctx, "bias_k"):
        ctx.member(_name(ctx, "bias_k"), 2, qk, "producer")
        ctx.member(_name(ctx, "bias_v"), 2, vv, "producer")
    for arg, (t, rows, w, start) in enumerate(
        zip((q, k, v), (qk, qk, vv), weights, starts, strict=True)
    ):
        ctx.tap(
            "input", arg, t.ndim - 1, rows, "project", project_weight=w,
            project_bias=bias if m._qkv_same_embed_dim else None, project_start=start,
        )  # fmt: skip
    out = ctx.fresh(m.out_proj.out_features)
    ctx.member(_name(ctx, "out_proj.weight"), 1, vv, "consumer")
    ctx.member(_name(ctx, "out_proj.weight"), 0, out, "producer")
    if m.out_proj.bias is not None:
        ctx.member(_name(ctx, "out_proj.bias"), 0, out, "producer")
    for layout in (qk, vv):
        ctx.groups(layout, heads, ctx.path)
    ctx.tie(qk, vv, f"{ctx.path}.heads")
    ctx.hint(qk, f"{ctx.path}.qk")
    ctx.hint(vv, f"{ctx.path}.v")
    y = ctx.record(TDims(q.dims[:-1] + (out,), ctx.out_shape(0)))
    w_meta = ctx.out[1]
    if not isinstance(w_meta, Meta):
        return (y, None)
    return (
        y,
        ctx.record(TDims(tuple(ctx.fresh(n, spatial=True) for n in w_meta.shape), w_meta.shape)),
    )


def _transposed_linear(ctx: Ctx) -> TDims:
    """A linear layer whose weight is stored (in, out): Hugging Face's ``Conv1D`` (GPT-2)."""
    x, w = ctx.tensor(0), ctx.module.weight
    inp, out = x.dims[-1], ctx.fresh(w.shape[1])
    ctx.member(_name(ctx, "weight"), 0, inp, "consumer")
    ctx.mix(x, -1)
    ctx.tap("input", 0, x.ndim - 1, inp, "consumer")
    ctx.member(_name(ctx, "weight"), 1, out, "producer")
    if _has(ctx, "bias"):
        ctx.member(_name(ctx, "bias"), 0, out, "producer")
    ctx.record(TDims((inp, out), tuple(w.shape)))
    y = ctx.record(TDims(x.dims[:-1] + (out,), ctx.out_shape()))
    ctx.tap("output", 0, y.ndim - 1, out, "producer")
    return y


_LIBRARY_LAYERS = {("transformers.pytorch_utils", "Conv1D"): _transposed_linear}


def register_library_layers() -> None:
    """Layer types of optional libraries, registered once the caller has imported the
    library (a model from it exists then); the library is never imported here."""
    for (module_name, class_name), rule in _LIBRARY_LAYERS.items():
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and all(cls not in lt.types for lt in LAYERS):
            register_layer(cls)(rule)
