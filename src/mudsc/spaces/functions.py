"""Rules for torch functions, Python operators and tensor methods."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from mudsc.spaces.atoms import Unsplittable
from mudsc.spaces.context import Ctx, Meta, Stacked, TDims, Value
from mudsc.spaces.layouts import (
    concat,
    elementwise,
    index,
    pad,
    permute,
    reduce,
    reshape,
    spatial_tail,
    split,
)
from mudsc.spaces.rules import register_function_rule, register_method_rule

# -- elementwise -------------------------------------------------------------------------
_BINARY_FUNCS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.pow, torch.add, torch.sub, torch.subtract,
    torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide, torch.maximum,
    torch.minimum, torch.where, torch.pow, torch.lerp, torch.addcmul, torch.addcdiv,
)  # fmt: skip
_BINARY_METHODS = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_", "maximum",
    "minimum", "masked_fill", "masked_fill_", "where", "lerp", "addcmul", "addcdiv",
)  # fmt: skip
_UNARY_FUNCS = (
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.abs, torch.neg, operator.neg, torch.clamp, torch.clip, torch.erf,
    torch.square, torch.sign, torch.sin, torch.cos, F.relu, F.relu6, F.gelu, F.silu, F.elu,
    F.selu, F.celu, F.leaky_relu, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish,
    F.softplus, F.softsign, F.tanh, F.sigmoid, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
)  # fmt: skip
_UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log", "sqrt",
    "rsqrt", "abs", "neg", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "erf",
    "square", "sign", "sin", "cos", "float", "double", "half", "bfloat16", "to", "type",
    "type_as", "contiguous", "clone", "detach", "requires_grad_", "cpu", "cuda",
)  # fmt: skip
_PASS_THROUGH = {"contiguous", "clone", "detach", "to", "float", "double", "half", "type_as"}
_ATEN_PASS_THROUGH = {"aten.contiguous", "aten.clone", "aten.detach", "aten._to_copy",
                      "aten.alias", "aten.to", "aten.type_as", "aten.lift_fresh_copy"}  # fmt: skip
_ATEN = torch.ops.aten
_RESIDUAL = {
    operator.add, operator.sub, operator.iadd, torch.add, torch.sub, "add", "add_", "sub",
    "sub_", _ATEN.add, _ATEN.add_, _ATEN.sub, _ATEN.sub_,
}  # fmt: skip


def op_of(node: fx.Node) -> object:
    """A node's target, an ATen overload read as its packet (``aten.add.Tensor`` -> add)."""
    return getattr(node.target, "overloadpacket", node.target)


def _tensors(ctx: Ctx) -> list[TDims]:
    values = list(ctx.args) + list(ctx.kwargs.values())
    out = []
    for v in values:
        if isinstance(v, Stacked):
            v = ctx.collapse(v)
        if isinstance(v, TDims):
            out.append(v)
    return out


@register_function_rule(*_BINARY_FUNCS)
@register_method_rule(*_BINARY_METHODS)
def _binary(ctx: Ctx) -> TDims:
    shape = ctx.out_shape()
    inputs = _tensors(ctx)
    y = elementwise(ctx, inputs, shape)
    target = op_of(ctx.node)
    residual = target in _RESIDUAL
    full = [i for i, a in enumerate(ctx.args) if isinstance(a, TDims) and a.shape == shape]
    if residual and sum(ctx.activation(i) for i in full) >= 2:
        for d in y.dims:
            ctx.records.residuals.append((d, ctx.path))
    return y


@register_function_rule(*_UNARY_FUNCS)
@register_method_rule(*_UNARY_METHODS)
def _unary(ctx: Ctx) -> Value:
    value = ctx.get(0)
    if isinstance(value, Stacked) and (
        ctx.node.target in _PASS_THROUGH or str(op_of(ctx.node)) in _ATEN_PASS_THROUGH
    ):
        return value
    x = ctx.tensor(0)
    return ctx.record(TDims(x.dims, ctx.out_shape()))


@register_function_rule(torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
                        torch.rand_like, torch.randn_like)  # fmt: skip
@register_method_rule("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")
def _constant(ctx: Ctx) -> TDims:
    """A constant tensor: fixed layouts (order-sensitive values are never permuted)."""
    shape = ctx.out_shape()
    return ctx.record(TDims(tuple(ctx.atoms.layout(n, fixed="constant") for n in shape), shape))


# -- shape ops ---------------------------------------------------------------------------
@register_function_rule(torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
                        torch.unflatten)  # fmt: skip
@register_method_rule("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                      "view_as", "reshape_as", "squeeze_", "unsqueeze_")  # fmt: skip
def _reshape(ctx: Ctx) -> Value:
    shape = ctx.out_shape()
    return reshape(ctx, ctx.tensor(0), shape, _stack_axis(ctx.node, len(shape), shape))


def _stack_axis(node: fx.Node, ndim: int, shape: tuple[int, ...]) -> int | None:
    """The first new dim whose only uses select one index (q, k, v = qkv[0], qkv[1], ...)."""
    for axis in range(ndim):
        if shape[axis] > 1 and _selected_only(node, axis, ndim, 0):
            return axis
    return None


def _selected_only(node: fx.Node, axis: int, ndim: int, depth: int) -> bool:
    """Whether every use of ``node`` selects one index of ``axis`` (possibly after moving
    the axis by permutes and transposes)."""
    users = list(node.users)
    if not users or depth > 6:
        return False
    return all(_use_selects(u, axis, ndim, depth) for u in users)


def _use_selects(use: fx.Node, axis: int, ndim: int, depth: int) -> bool:
    name = use.target if use.op == "call_method" else getattr(op_of(use), "__name__", None)
    rest = list(use.args[1:])
    if name == "select" and isinstance(rest[0], int):  # ATen: select(x, dim, index)
        return rest[0] % ndim == axis
    if name == "getitem":
        return _index_selects(rest[0] if rest else None, axis)
    if name == "unbind":
        dim = rest[0] if rest else use.kwargs.get("dim", 0)
        return isinstance(dim, int) and dim % ndim == axis
    moved = _axis_after(name, rest, axis, ndim)
    return moved is not None and _selected_only(use, moved, ndim, depth + 1)


def _index_selects(idx: object, axis: int) -> bool:
    """Whether an index expression picks one integer position of ``axis`` (and keeps the
    axes before it whole)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    if Ellipsis in items or None in items[: axis + 1] or len(items) <= axis:
        return False
    return isinstance(items[axis], int) and all(it == slice(None) for it in items[:axis])


def _axis_after(name: object, rest: list, axis: int, ndim: int) -> int | None:
    """Where ``axis`` goes through a permute, transpose or contiguous; None for other ops."""
    if name == "permute":
        order = rest[0] if len(rest) == 1 and isinstance(rest[0], list | tuple) else rest
        if not all(isinstance(o, int) for o in order):
            return None
        return [o % ndim for o in order].index(axis)
    if name in ("transpose", "swapaxes") and all(isinstance(r, int) for r in rest[:2]):
        a, b = (r % ndim for r in rest[:2])
        return b if axis == a else a if axis == b else axis
    if name in ("contiguous", "clone", "alias"):
        return axis
    return None


@register_function_rule(torch.permute)
@register_method_rule("permute")
def _permute(ctx: Ctx) -> Value:
    rest = list(ctx.args[1:]) or [ctx.kwargs.get("dims")]
    order = rest[0] if len(rest) == 1 and isinstance(rest[0], list | tuple) else rest
    return permute(ctx, _raw(ctx), order)


@register_function_rule(torch.transpose, torch.swapaxes)
@register_method_rule("transpose", "swapaxes", "t")
def _transpose(ctx: Ctx) -> Value:
    value = _raw(ctx)
    n = len(value.shape)
    a, b = (ctx.args[1], ctx.args[2]) if len(ctx.args) >= 3 else (0, 1)
    order = list(range(n))
    order[a % n], order[b % n] = order[b % n], order[a % n]
    return permute(ctx, value, order)


def _raw(ctx: Ctx) -> TDims | Stacked:
    value = ctx.get(0)
    if not isinstance(value, TDims | Stacked):
        raise Unsplittable("expected a tensor")
    return value


@register_method_rule("expand", "expand_as", "broadcast_to")
@register_function_rule(torch.broadcast_to)
def _expand(ctx: Ctx) -> TDims:
    x, shape = ctx.tensor(0), ctx.out_shape()
    dims = []
    for k in range(1, len(shape) + 1):
        if k <= x.ndim and x.shape[-k] == shape[-k]:
            dims.append(x.dims[-k])
        else:
            dims.append(ctx.fresh(shape[-k]))
    return ctx.record(TDims(tuple(reversed(dims)), shape))


@register_function_rule(operator.getitem)
def _getitem(ctx: Ctx) -> Value:
    obj, idx = ctx.get(0), ctx.get(1)
    if isinstance(obj, tuple | list):
        return obj[idx]
    return indexed(ctx, obj, idx if isinstance(idx, tuple) else (idx,))


def indexed(ctx: Ctx, obj: Value, items: tuple) -> TDims:
    """``obj[items]`` by basic indexing; selecting one part of a stacked value keeps it."""
    if isinstance(obj, Stacked):
        a = obj.axis
        if (
            len(items) > a
            and isinstance(items[a], int)
            and all(it == slice(None) for it in items[:a])
        ):
            part = obj.parts[items[a]]
            rest = items[:a] + items[a + 1 :]
            return index(ctx, part, rest, ctx.out_shape())
        obj = ctx.collapse(obj)
    if not isinstance(obj, TDims):
        raise Unsplittable("indexing a value that is not a tensor")
    return index(ctx, obj, items, ctx.out_shape())


@register_function_rule(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx: Ctx) -> TDims:
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    tensors = [ctx.collapse(t) if isinstance(t, Stacked) else t for t in tensors]
    if not all(isinstance(t, TDims) for t in tensors):
        raise Unsplittable("cat of non-tensors")
    shape = ctx.out_shape()
    return concat(ctx, tensors, dim % len(shape), shape)


@register_function_rule(torch.stack)
def _stack(ctx: Ctx) -> Stacked:
    tensors = [ctx.collapse(t) if isinstance(t, Stacked) else t for t in ctx.arg(0, "tensors")]
    if not all(isinstance(t, TDims) for t in tensors):
        raise Unsplittable("stack of non-tensors")
    shape = ctx.out_shape()
    return Stacked(ctx.arg(1, "dim", 0) % len(shape), tuple(tensors), shape)


@register_function_rule(torch.chunk, torch.split, torch.tensor_split)
@register_method_rule("chunk", "split", "tensor_split")
def _split(ctx: Ctx) -> tuple:
    x = ctx.tensor(0)
    dim = ctx.arg(2, "dim", 0) % x.ndim
    sizes = [m.shape[dim] for m in ctx.out]
    return split(ctx, x, dim, sizes)


@register_function_rule(torch.unbind)
@register_method_rule("unbind")
def _unbind(ctx: Ctx) -> tuple:
    value = _raw(ctx)
    dim = ctx.arg(1, "dim", 0) % len(value.shape)
    if isinstance(value, Stacked) and value.axis == dim:
        return value.parts
    x = ctx.tensor(0)
    return split(ctx, x, dim, [1] * x.shape[dim], keep=False)


# -- contractions and reductions -----------------------------------------------------------
@register_function_rule(operator.matmul, torch.matmul, torch.bmm)
@register_method_rule("matmul", "bmm", "__matmul__")
def _matmul(ctx: Ctx) -> TDims:
    a, b = ctx.tensor(0), ctx.tensor(1)
    if a.ndim < 2 or b.ndim < 2:
        raise Unsplittable("matmul with a vector operand")
    ctx.union(a.dims[-1], b.dims[-2])
    for t, axis in ((a, -1), (b, -2)):
        ctx.mix(t, axis)
        ctx.consume(t, axis)
    batch = elementwise(
        ctx,
        [TDims(a.dims[:-2], a.shape[:-2]), TDims(b.dims[:-2], b.shape[:-2])],
        ctx.out_shape()[:-2],
    )
    return ctx.record(TDims(batch.dims + (a.dims[-2], b.dims[-1]), ctx.out_shape()))


@register_function_rule(torch.einsum)
def _einsum(ctx: Ctx) -> TDims:
    """Explicit einsum (no ``...``, no diagonals): one letter is one set of units across
    operands; letters missing from the output are contracted (mixed)."""
    equation = ctx.get(0)
    operands = list(ctx.args[1:])
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = list(operands[0])
    tensors = [ctx.collapse(t) if isinstance(t, Stacked) else t for t in operands]
    if not isinstance(equation, str) or "." in equation:
        raise Unsplittable("einsum with an ellipsis or a computed equation")
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not arrow:
        rhs = "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
    if len(terms) != len(tensors) or not all(isinstance(t, TDims) for t in tensors):
        raise Unsplittable("einsum operands")
    letters: dict[str, TDims] = {}
    for term, t in zip(terms, tensors, strict=True):
        if len(set(term)) != len(term) or len(term) != t.ndim:
            raise Unsplittable("einsum diagonal or rank mismatch")
        for axis, c in enumerate(term):
            _einsum_letter(ctx, letters, c, TDims((t.dims[axis],), (t.shape[axis],)))
            if c not in rhs:
                ctx.mix(t, axis)
                ctx.consume(t, axis)
    shape = ctx.out_shape()
    return ctx.record(TDims(tuple(letters[c].dims[0] for c in rhs), shape))


def _einsum_letter(ctx: Ctx, letters: dict[str, TDims], c: str, axis: TDims) -> None:
    """Tie every axis of one letter; size-1 axes broadcast and impose nothing."""
    known = letters.get(c)
    if known is None or (known.shape[0] == 1 and axis.shape[0] > 1):
        letters[c] = axis
    elif axis.shape[0] > 1:
        ctx.union(known.dims[0], axis.dims[0])


@register_function_rule(F.scaled_dot_product_attention)
def _sdpa(ctx: Ctx) -> TDims:
    q, k, v = ctx.tensor(0), ctx.tensor(1), ctx.tensor(2)
    mask = ctx.tensor(3) or ctx.tensor("attn_mask")
    if ctx.kwargs.get("enable_gqa"):
        raise Unsplittable("grouped-query attention")
    ctx.union(q.dims[-1], k.dims[-1])
    ctx.union(k.dims[-2], v.dims[-2])
    for t, axis in ((q, -1), (k, -1), (k, -2), (v, -2)):
        ctx.mix(t, axis)
    shape = ctx.out_shape()
    lead = [TDims(t.dims[:-2], t.shape[:-2]) for t in (q, k, v)]
    batch = elementwise(ctx, lead, shape[:-2])
    if mask is not None:
        scores = TDims(
            batch.dims + (q.dims[-2], k.dims[-2]), shape[:-2] + (q.shape[-2], k.shape[-2])
        )
        elementwise(ctx, [scores, mask], scores.shape)
    return ctx.record(TDims(batch.dims + (q.dims[-2], v.dims[-1]), shape))


@register_function_rule(F.linear)
def _flinear(ctx: Ctx) -> TDims:
    x, w, b = ctx.tensor(0), ctx.tensor(1), ctx.tensor(2) or ctx.tensor("bias")
    ctx.union(x.dims[-1], w.dims[-1])
    ctx.mix(x, -1)
    ctx.consume(w, -1)
    if b is not None:
        ctx.union(b.dims[-1], w.dims[0])
    return ctx.record(TDims(x.dims[:-1] + (w.dims[0],), ctx.out_shape()))


@register_function_rule(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
                        F.normalize)  # fmt: skip
@register_method_rule("softmax", "log_softmax")
def _softmax(ctx: Ctx) -> TDims:
    x = ctx.tensor(0)
    default = 1 if ctx.node.target is F.normalize else None
    dim = ctx.arg(1 if ctx.node.target is not F.normalize else 2, "dim", default)
    if dim is None:
        raise Unsplittable("softmax without an explicit dim")
    ctx.mix(x, dim)
    return ctx.record(TDims(x.dims, ctx.out_shape()))


_NORMS = ("norm", torch.norm, torch.linalg.vector_norm, _ATEN.linalg_vector_norm)


@register_function_rule(torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp,
                        torch.norm, torch.linalg.vector_norm)  # fmt: skip
@register_method_rule("mean", "sum", "amax", "amin", "logsumexp", "norm")
def _reduce(ctx: Ctx) -> TDims:
    x = ctx.tensor(0)
    target = op_of(ctx.node)
    pos = 2 if target in _NORMS else 1
    dim = ctx.arg(pos, "dim", None)
    keepdim = bool(ctx.arg(pos + 1, "keepdim", False))
    if dim is None:
        dim = list(range(x.ndim))
    axes = list(dim) if isinstance(dim, list | tuple) else [dim]
    return reduce(ctx, x, axes, keepdim)


_POOL_FUNCS = {
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
    F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, F.max_pool1d: 1, F.max_pool2d: 2,
    F.max_pool3d: 3, F.interpolate: 0,
}  # fmt: skip


@register_function_rule(*_POOL_FUNCS)
def _fpool(ctx: Ctx) -> TDims:
    """Pooling, resizing and padding: the trailing spatial axes become new fixed axes."""
    if not isinstance(ctx.out, Meta):
        raise Unsplittable("pooling that returns indices")
    x = ctx.tensor(0)
    k = _POOL_FUNCS[ctx.node.target] or x.ndim - 2
    return spatial_tail(ctx, x, k, ctx.out_shape())


@register_function_rule(F.pad)
def _pad(ctx: Ctx) -> TDims:
    """Zero (constant) padding keeps units in place; other modes are spatial resampling."""
    x, widths = ctx.tensor(0), list(ctx.arg(1, "pad"))
    if ctx.arg(2, "mode", "constant") == "constant":
        return pad(ctx, x, widths, ctx.out_shape())
    return spatial_tail(ctx, x, len(widths) // 2, ctx.out_shape())
