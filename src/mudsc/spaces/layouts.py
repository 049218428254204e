"""Shape algebra shared by the rules: broadcasting, reshape, slicing, concatenation.

Each helper maps input layouts to output layouts and raises :class:`Unsplittable` when
the result cannot be expressed, in which case the op is treated as unsupported.
"""

from __future__ import annotations

from collections.abc import Sequence

from mudsc.spaces.atoms import Layout, Seg, Unsplittable, cut_points
from mudsc.spaces.context import Ctx, Stacked, TDims


def elementwise(ctx: Ctx, inputs: Sequence[TDims | None], shape: tuple[int, ...]) -> TDims:
    """Broadcast from the right: equal-length dims are tied, size-1 dims impose nothing."""
    dims: list[Layout] = []
    for k in range(1, len(shape) + 1):
        n = shape[-k]
        same = [t.dims[-k] for t in inputs if t is not None and t.ndim >= k and t.shape[-k] == n]
        if n == 1 or not same:
            dims.append(((),) if n == 1 else ctx.fresh(n))
            continue
        for other in same[1:]:
            ctx.union(same[0], other)
        dims.append(same[0])
    return ctx.record(TDims(tuple(reversed(dims)), tuple(shape)))


def product(ctx: Ctx, layouts: Sequence[Layout]) -> Layout:
    """Merge consecutive dims into one (outer first); an inner concatenation is unsplittable."""
    out: Layout = ((),)
    for layout in layouts:
        layout = ctx.atoms.expand(layout)
        if ctx.atoms.layout_size(layout) == 1:
            continue
        if len(layout) == 1:
            out = tuple(s + layout[0] for s in out)
        elif out == ((),):
            out = layout
        else:
            raise Unsplittable("merging a dimension that is a concatenation into an inner position")
    return out


def factor(ctx: Ctx, seg: Seg, inner: int) -> tuple[Seg, Seg]:
    """Write a segment as (outer product) x (inner product of ``inner`` positions)."""
    atoms = ctx.atoms
    leaves = [a for a in seg if atoms.size[atoms.find(a)] > 1]
    size = atoms.seg_size(tuple(leaves))
    if size % inner:
        raise Unsplittable("a reshape that does not divide a dimension")
    cuts = sorted(cut_points(atoms, leaves) | {inner})
    if any(hi % lo for lo, hi in zip(cuts, cuts[1:], strict=False)):
        if not all(atoms.is_fixed(a) for a in leaves):
            raise Unsplittable("a reshape across incompatible factors")
        # Fixed classes are never permuted: fresh fixed factors need no link back.
        outer = atoms.new(size // inner, "reshaped fixed axis") if size > inner else None
        return ((outer,) if outer is not None else ()), (atoms.new(inner, "reshaped fixed axis"),)
    leaves = atoms.refine_to([atoms.leaf(a) for a in leaves], cuts)
    acc = 1
    for i in range(len(leaves), -1, -1):
        if acc == inner:
            return tuple(leaves[:i]), tuple(leaves[i:])
        acc *= atoms.size[leaves[i - 1]] if i else 1
    raise Unsplittable("a reshape that does not divide a dimension")


def split_outer(ctx: Ctx, layout: Layout, outer: int) -> tuple[Layout, Layout]:
    """Split a dimension into (outer, inner) dims; inner parts of all segments are tied."""
    layout = ctx.atoms.expand(layout)
    total = ctx.atoms.layout_size(layout)
    inner = total // outer
    outs: list[Seg] = []
    inners: list[Layout] = []
    for seg in layout:
        if ctx.atoms.seg_size(seg) % inner:
            raise Unsplittable("a reshape that cuts a concatenated segment")
        o, i = factor(ctx, seg, inner)
        outs.append(o)
        inners.append((i,))
    for other in inners[1:]:
        ctx.union(inners[0], other)
    return tuple(outs), inners[0]


def cut(ctx: Ctx, layout: Layout, sizes: Sequence[int]) -> list[Layout]:
    """Cut a dimension into consecutive chunks of the given sizes (refining classes)."""
    atoms = ctx.atoms
    segs = list(atoms.expand(layout))
    chunks: list[Layout] = []
    for n in sizes:
        chunk: list[Seg] = []
        while n > 0:
            if not segs:
                raise Unsplittable("chunk sizes exceed the dimension")
            m = atoms.seg_size(segs[0])
            if m > n:
                segs[0:1] = atoms.cut(segs[0], n)
                m = n
            chunk.append(segs.pop(0))
            n -= m
        chunks.append(tuple(chunk))
    return chunks


def reshape(
    ctx: Ctx, td: TDims, shape: tuple[int, ...], stack: int | None = None
) -> TDims | Stacked:
    """Reshape by grouping dims with equal products; ``stack`` makes that out dim a Stacked."""
    src, dst = td.shape, tuple(shape)
    if 0 in src or 0 in dst:
        raise Unsplittable("reshape of an empty tensor")
    out: list[Layout | None] = [None] * len(dst)
    i = j = 0
    stack_block: tuple[list[int], Layout] | None = None
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1:
            i += 1
            continue
        if j < len(dst) and dst[j] == 1:
            out[j] = ((),)
            j += 1
            continue
        ii, jj = [i], [j]
        pi, pj = src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= src[i]
                ii.append(i)
                i += 1
            else:
                pj *= dst[j]
                jj.append(j)
                j += 1
        merged = product(ctx, [td.dims[k] for k in ii])
        if stack is not None and stack in jj:
            stack_block = (jj, merged)
            continue
        for k in jj[:-1]:
            out[k], merged = split_outer(ctx, merged, dst[k])
        out[jj[-1]] = merged
    if stack_block is None:
        return ctx.record(TDims(tuple(out), dst))  # type: ignore[arg-type]
    jj, merged = stack_block
    parts = []
    for layout_j in _stack_parts(ctx, jj, merged, dst, stack):
        dims = list(out)
        for k, lay in layout_j.items():
            dims[k] = lay
        del dims[stack]
        parts.append(ctx.record(TDims(tuple(dims), dst[:stack] + dst[stack + 1 :])))  # type: ignore[arg-type]
    return Stacked(stack, tuple(parts), dst)


def _stack_parts(
    ctx: Ctx, jj: list[int], merged: Layout, dst: tuple[int, ...], stack: int
) -> list[dict[int, Layout]]:
    """Layouts of the dims of one reshape block, per index of its stack dim.

    Dims outside the stack dim are shared by all parts; the stack dim cuts the rest into
    independent chunks, so q, k and v of a fused projection get their own classes.
    """
    shared: dict[int, Layout] = {}
    rest = merged
    for k in (k for k in jj if k < stack):
        shared[k], rest = split_outer(ctx, rest, dst[k])
    size = ctx.atoms.layout_size(rest)
    chunks = cut(ctx, rest, [size // dst[stack]] * dst[stack])
    after = [k for k in jj if k > stack]
    parts = []
    for chunk in chunks:
        layouts = dict(shared)
        for k in after[:-1]:
            layouts[k], chunk = split_outer(ctx, chunk, dst[k])
        if after:
            layouts[after[-1]] = chunk
        parts.append(layouts)
    return parts


def index(ctx: Ctx, td: TDims, items: tuple, shape: tuple[int, ...]) -> TDims:
    """Basic indexing: ints and unit-step slices cut the dimension, None adds one."""
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded: list = []
    for it in items:
        if it is Ellipsis:
            expanded += [slice(None)] * (td.ndim - n_real)
        else:
            expanded.append(it)
    expanded += [slice(None)] * (td.ndim - sum(1 for it in expanded if it is not None))
    dims: list[Layout] = []
    d = 0
    for it in expanded:
        if it is None:
            dims.append(((),))
            continue
        layout, n = td.dims[d], td.shape[d]
        d += 1
        if isinstance(it, bool) or not isinstance(it, int | slice):
            raise Unsplittable(f"advanced indexing with {type(it).__name__}")
        if isinstance(it, int):
            i = it % n
            cut(ctx, layout, [i, 1, n - i - 1])
            continue
        start, stop, step = it.indices(n)
        if step != 1:
            if not all(ctx.atoms.is_fixed(a) for a in ctx.atoms.leaves(layout)):
                raise Unsplittable("strided slicing of a merge space")
            dims.append(ctx.atoms.layout(len(range(start, stop, step)), fixed="strided axis"))
            continue
        stop = max(stop, start)
        if (start, stop) == (0, n):
            dims.append(layout)
        else:
            dims.append(cut(ctx, layout, [start, stop - start, n - stop])[1])
    return ctx.record(TDims(tuple(dims), tuple(shape)))


def permute(ctx: Ctx, value: TDims | Stacked, order: Sequence[int]) -> TDims | Stacked:
    """Reorder dims; a stacked value moves its stack axis along."""
    n = len(value.shape)
    order = [o % n for o in order]
    shape = tuple(value.shape[o] for o in order)
    if isinstance(value, TDims):
        return ctx.record(TDims(tuple(value.dims[o] for o in order), shape))
    new_axis = order.index(value.axis)
    inner = [o - (o > value.axis) for o in order if o != value.axis]
    parts = tuple(permute(ctx, p, inner) for p in value.parts)
    return Stacked(new_axis, parts, shape)  # type: ignore[arg-type]


def concat(ctx: Ctx, tensors: Sequence[TDims], axis: int, shape: tuple[int, ...]) -> TDims:
    """Channel (or any-axis) concatenation: segments are concatenated, other dims tied."""
    tensors = [t for t in tensors if t.shape[axis] > 0]
    dims = list(tensors[0].dims)
    for t in tensors[1:]:
        for k in range(len(dims)):
            if k != axis:
                ctx.union(dims[k], t.dims[k])
    dims[axis] = tuple(seg for t in tensors for seg in ctx.atoms.expand(t.dims[axis]))
    return ctx.record(TDims(tuple(dims), tuple(shape)))


def split(ctx: Ctx, td: TDims, axis: int, sizes: Sequence[int], keep: bool = True) -> tuple:
    """chunk / split / unbind along ``axis``: one output per chunk."""
    chunks = cut(ctx, td.dims[axis], sizes)
    outs = []
    for chunk, n in zip(chunks, sizes, strict=True):
        dims = list(td.dims)
        shape = list(td.shape)
        if keep:
            dims[axis], shape[axis] = (chunk or ((),)), n
        else:
            del dims[axis], shape[axis]
        outs.append(ctx.record(TDims(tuple(dims), tuple(shape))))
    return tuple(outs)


def reduce(ctx: Ctx, td: TDims, axes: Sequence[int], keepdim: bool) -> TDims:
    """Sum/mean/max over axes (order-invariant), recorded as mixes."""
    axes = sorted({a % td.ndim for a in axes})
    for a in axes:
        ctx.mix(td, a)
    dims, shape = [], []
    for k in range(td.ndim):
        if k not in axes:
            dims.append(td.dims[k])
            shape.append(td.shape[k])
        elif keepdim:
            dims.append(((),))
            shape.append(1)
    return ctx.record(TDims(tuple(dims), tuple(shape)))


def spatial_tail(ctx: Ctx, td: TDims, k: int, shape: tuple[int, ...]) -> TDims:
    """Pooling, resizing, padding: leading dims kept, the last ``k`` dims new and fixed.

    The replaced input axes are fixed too: windows are order-sensitive along them.
    """
    lead = len(shape) - k
    if lead != td.ndim - k or tuple(td.shape[:lead]) != tuple(shape[:lead]):
        raise Unsplittable("a spatial op that changes its leading dims")
    for d in td.dims[lead:]:
        ctx.atoms.fix_layout(d, "spatial axis")
    dims = list(td.dims[:lead]) + [ctx.fresh(n, spatial=True) for n in shape[lead:]]
    return ctx.record(TDims(tuple(dims), tuple(shape)))


def pad(ctx: Ctx, td: TDims, widths: Sequence[int], shape: tuple[int, ...]) -> TDims:
    """Constant padding: each padded dim becomes (fixed padding | original | fixed padding)."""
    dims = list(td.dims)
    for i in range(len(widths) // 2):
        before, after = widths[2 * i], widths[2 * i + 1]
        axis = td.ndim - 1 - i
        if before < 0 or after < 0:
            raise Unsplittable("negative padding (cropping)")
        pads = [
            ctx.atoms.expand(ctx.atoms.layout(n, fixed="padding")) if n else ()
            for n in (before, after)
        ]
        dims[axis] = pads[0] + ctx.atoms.expand(dims[axis]) + pads[1]
    return ctx.record(TDims(tuple(dims), tuple(shape)))
