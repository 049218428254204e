"""Rules for ATen ops: what the export route records outside modules with a layer type.

Where an ATen op has a torch-level twin with the same signature (``aten.linear`` and
``F.linear``, ``aten.permute`` and ``torch.permute``...) the twin's rule is registered
for it; the ops below have ATen-only signatures.  Rules are keyed by the op's packet
(``aten.add``), so every overload (``aten.add.Tensor``, ``aten.add.Scalar``) shares one.
"""

from __future__ import annotations

import torch

from mudsc.spaces import functions as fn
from mudsc.spaces.atoms import Unsplittable
from mudsc.spaces.context import Ctx, Meta, TDims, Value
from mudsc.spaces.layouts import elementwise, pad, spatial_tail
from mudsc.spaces.rules import register_function_rule

aten = torch.ops.aten

_BINARY = (
    aten.add, aten.add_, aten.sub, aten.sub_, aten.rsub, aten.mul, aten.mul_, aten.div,
    aten.div_, aten.pow, aten.maximum, aten.minimum, aten.where, aten.masked_fill,
    aten.masked_fill_, aten.lerp, aten.addcmul, aten.addcdiv, aten.eq, aten.ne, aten.lt,
    aten.le, aten.gt, aten.ge, aten.logical_and, aten.logical_or, aten.logical_xor,
    aten.bitwise_and, aten.bitwise_or, aten.bitwise_not, aten.logical_not, aten.fmod,
    aten.remainder, aten.floor_divide, aten.__and__, aten.__or__, aten.__xor__,
)  # fmt: skip
_UNARY = (
    aten.relu, aten.relu_, aten.gelu, aten.silu, aten.silu_, aten.sigmoid, aten.tanh,
    aten.exp, aten.log, aten.log1p, aten.expm1, aten.sqrt, aten.rsqrt, aten.reciprocal,
    aten.abs, aten.neg, aten.erf, aten.clamp, aten.clamp_min, aten.clamp_max, aten.hardtanh,
    aten.hardtanh_, aten.hardswish, aten.hardsigmoid, aten.leaky_relu, aten.elu, aten.selu,
    aten.celu, aten.softplus, aten.mish, aten.square, aten.sign, aten.sin, aten.cos,
    aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.clone, aten.contiguous,
    aten.detach, aten.alias, aten._to_copy, aten.to, aten.type_as, aten.lift_fresh_copy,
)  # fmt: skip
_CONSTANT = (
    aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.scalar_tensor,
    aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like, aten.new_zeros,
    aten.new_ones, aten.new_full, aten.new_empty, aten.rand_like, aten.randn_like,
)  # fmt: skip

register_function_rule(*_BINARY)(fn._binary)
register_function_rule(*_UNARY)(fn._unary)
register_function_rule(*_CONSTANT)(fn._constant)
register_function_rule(
    aten.view,
    aten.reshape,
    aten._unsafe_view,
    aten.flatten,
    aten.unflatten,
    aten.squeeze,
    aten.unsqueeze,
    aten.view_as,
    aten.reshape_as,
)(fn._reshape)
register_function_rule(aten.permute)(fn._permute)
register_function_rule(aten.transpose, aten.swapaxes, aten.t)(fn._transpose)
register_function_rule(aten.expand, aten.expand_as, aten.broadcast_to)(fn._expand)
register_function_rule(aten.cat, aten.concat)(fn._cat)
register_function_rule(aten.stack)(fn._stack)
register_function_rule(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split)(fn._split)
register_function_rule(aten.unbind)(fn._unbind)
register_function_rule(aten.matmul, aten.bmm, aten.mm)(fn._matmul)
register_function_rule(aten.scaled_dot_product_attention)(fn._sdpa)
register_function_rule(aten.linear)(fn._flinear)
register_function_rule(aten.pad)(fn._pad)
register_function_rule(aten.einsum)(fn._einsum)
register_function_rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)(
    fn._softmax
)
register_function_rule(
    aten.mean, aten.sum, aten.amax, aten.amin, aten.logsumexp, aten.linalg_vector_norm
)(fn._reduce)


@register_function_rule(aten.select)
def _select(ctx: Ctx) -> TDims:
    dim, i = ctx.arg(1, "dim"), ctx.arg(2, "index")
    return fn.indexed(ctx, ctx.get(0), (slice(None),) * dim + (i,))


@register_function_rule(aten.slice)
def _slice(ctx: Ctx) -> TDims:
    dim, start = ctx.arg(1, "dim", 0), ctx.arg(2, "start", None)
    end, step = ctx.arg(3, "end", None), ctx.arg(4, "step", 1)
    return fn.indexed(ctx, ctx.get(0), (slice(None),) * dim + (slice(start, end, step),))


@register_function_rule(aten.addmm)
def _addmm(ctx: Ctx) -> TDims:
    """``bias + a @ b`` (Hugging Face's Conv1D: the weight stored as (in, out))."""
    bias, a, b = ctx.tensor(0), ctx.tensor(1), ctx.tensor(2)
    ctx.union(a.dims[-1], b.dims[0])
    ctx.mix(a, -1)
    ctx.consume(b, 0)
    y = TDims((a.dims[0], b.dims[1]), ctx.out_shape())
    return ctx.record(elementwise(ctx, [y, bias], ctx.out_shape()))


@register_function_rule(aten.embedding)
def _embedding(ctx: Ctx) -> TDims:
    """Rows picked by index: the row axis is order-sensitive (fixed), columns are units."""
    w, idx = ctx.tensor(0), ctx.tensor(1)
    ctx.atoms.fix_layout(w.dims[0], "embedding rows (indexed)")
    return ctx.record(TDims(idx.dims + (w.dims[1],), ctx.out_shape()))


# functional convolutions, ATen and torch level (F.conv2d is torch.conv2d): transposed?
_CONV = {
    aten.conv1d: False, aten.conv2d: False, aten.conv3d: False,
    aten.conv_transpose1d: True, aten.conv_transpose2d: True, aten.conv_transpose3d: True,
    torch.conv1d: False, torch.conv2d: False, torch.conv3d: False,
    torch.conv_transpose1d: True, torch.conv_transpose2d: True, torch.conv_transpose3d: True,
}  # fmt: skip


@register_function_rule(aten.convolution, *_CONV)
def _conv(ctx: Ctx) -> TDims:
    """Functional convolution: weight (out, in/groups, *k), or (in, out/groups, *k) when
    transposed; plain and depthwise ones are split, other grouped ones are refused."""
    x, w = ctx.tensor(0), ctx.tensor(1)
    b = ctx.tensor(2) if len(ctx.args) > 2 else ctx.tensor("bias")
    target = getattr(ctx.node.target, "overloadpacket", ctx.node.target)
    if target is aten.convolution:
        transposed, groups = bool(ctx.arg(6, "transposed")), ctx.arg(8, "groups")
    else:
        transposed, groups = _CONV[target], ctx.arg(6, "groups", 1)
    w_in, w_out = (0, 1) if transposed else (1, 0)
    ch, shape = 1, ctx.out_shape()
    for d in x.dims[ch + 1 :]:
        ctx.atoms.fix_layout(d, "convolved spatial axis")
    for d in w.dims[2:]:
        ctx.atoms.fix_layout(d, "kernel axis")
    if groups == 1:
        ctx.union(x.dims[ch], w.dims[w_in])
        ctx.mix(x, ch)
        ctx.consume(w, w_in)
        out = w.dims[w_out]
    elif groups == x.shape[ch] == shape[ch] and w.shape[1] == 1:
        ctx.union(x.dims[ch], w.dims[0])  # depthwise
        ctx.atoms.fix_layout(w.dims[1], "depthwise kernel")
        out = x.dims[ch]
    else:
        raise Unsplittable("grouped functional convolution")
    if b is not None:
        ctx.union(b.dims[0], out)
    spatial = tuple(ctx.fresh(n, spatial=True) for n in shape[ch + 1 :])
    return ctx.record(TDims(x.dims[:ch] + (out,) + spatial, shape))


def _per_channel(ctx: Ctx, x: TDims, ch: int, tensors: list[TDims | None]) -> TDims:
    for t in tensors:
        if t is not None:
            ctx.union(t.dims[0], x.dims[ch])
    return ctx.record(TDims(x.dims, ctx.out_shape() if isinstance(ctx.out, Meta) else x.shape))


@register_function_rule(aten.layer_norm)
def _layer_norm(ctx: Ctx) -> TDims:
    x, w, b = ctx.tensor(0), ctx.tensor(2), ctx.tensor(3)
    k = len(ctx.arg(1, "normalized_shape"))
    for i in range(k):
        ctx.mix(x, x.ndim - k + i)
        for t in (w, b):
            if t is not None:
                ctx.union(t.dims[i], x.dims[x.ndim - k + i])
    return ctx.record(TDims(x.dims, ctx.out_shape()))


@register_function_rule(aten.group_norm)
def _group_norm(ctx: Ctx) -> TDims:
    x = ctx.tensor(0)
    ctx.mix(x, 1)
    ctx.groups(x.dims[1], ctx.arg(1, "num_groups"), "group_norm")
    return _per_channel(ctx, x, 1, [ctx.tensor(2), ctx.tensor(3)])


@register_function_rule(aten.batch_norm, aten._native_batch_norm_legit_no_training)
def _batch_norm(ctx: Ctx) -> Value:
    x = ctx.tensor(0)
    y = _per_channel(ctx, x, 1, [ctx.tensor(i) for i in (1, 2, 3, 4)])
    if isinstance(ctx.out, Meta):
        return y
    return (TDims(y.dims, ctx.out_shape(0)),) + tuple(
        ctx.record(TDims((x.dims[1],), m.shape)) if isinstance(m, Meta) else None
        for m in ctx.out[1:]
    )


@register_function_rule(aten.constant_pad_nd)
def _constant_pad(ctx: Ctx) -> TDims:
    return pad(ctx, ctx.tensor(0), list(ctx.arg(1, "pad")), ctx.out_shape())


_POOLS = {
    aten.max_pool1d: 1, aten.max_pool2d: 2, aten.max_pool3d: 3, aten.avg_pool1d: 1,
    aten.avg_pool2d: 2, aten.avg_pool3d: 3, aten.adaptive_avg_pool1d: 1,
    aten.adaptive_avg_pool2d: 2, aten.adaptive_avg_pool3d: 3, aten.adaptive_max_pool1d: 1,
    aten.adaptive_max_pool2d: 2, aten.adaptive_max_pool3d: 3, aten._adaptive_avg_pool2d: 2,
    aten.upsample_nearest2d: 2, aten.upsample_bilinear2d: 2,
}  # fmt: skip


@register_function_rule(*_POOLS)
def _pool(ctx: Ctx) -> TDims:
    if not isinstance(ctx.out, Meta):
        raise Unsplittable("pooling that returns indices")
    k = _POOLS[ctx.node.target.overloadpacket]
    return spatial_tail(ctx, ctx.tensor(0), k, ctx.out_shape())


@register_function_rule(aten.gather)
def _gather(ctx: Ctx) -> TDims:
    """``x.gather(dim, index)``: positions along ``dim`` are read by index (fixed); the
    other axes line up with the index's where their sizes agree, else they are fixed."""
    x, idx, shape = ctx.tensor(0), ctx.tensor(2), ctx.out_shape()
    dim = ctx.arg(1, "dim") % x.ndim
    dims = []
    for k in range(x.ndim):
        if k != dim and x.shape[k] == idx.shape[k]:
            ctx.union(x.dims[k], idx.dims[k])
            dims.append(x.dims[k])
            continue
        for t in (x, idx):
            ctx.atoms.fix_layout(t.dims[k], "gathered axis")
        dims.append(idx.dims[k])
    return ctx.record(TDims(tuple(dims), shape))


@register_function_rule(aten.cumsum, aten.cumprod, aten.diff, aten.flip)
def _along(ctx: Ctx) -> TDims:
    """Ops that read positions along their axes in order (attention-mask arithmetic):
    those axes are fixed.  (``roll`` has no rule on either route: it stays unsupported.)"""
    x = ctx.tensor(0)
    dims = ctx.arg(1, "dims" if ctx.node.target.overloadpacket is aten.flip else "dim", -1)
    for d in dims if isinstance(dims, list | tuple) else [dims]:
        ctx.atoms.fix_layout(x.dims[d % x.ndim], f"order-sensitive axis ({ctx.node.target})")
    return ctx.record(TDims(x.dims, ctx.out_shape()))
