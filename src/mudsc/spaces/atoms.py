"""Union-find over dimension *atoms*: the algebra behind automatic merge spaces.

Every tensor dimension seen while tracing is a *layout*: a concatenation of *segments*,
each segment the mixed-radix product of *atoms* (outermost first).  An atom names a
union-find class; two atoms in one class must be permuted identically.  A class may later
be *refined* (split into a product, e.g. ``D -> (heads, head_dim)``, or a concatenation,
e.g. ``3D -> q | k | v``); every occurrence of the class then expands to the refinement,
so a refinement made at one op holds consistently everywhere.

Whatever the algebra cannot express raises :class:`Unsplittable`, and the classes involved
are *fixed* (never permuted): over-constraining is always safe, under-constraining never.
"""

from __future__ import annotations

from math import prod

Seg = tuple[int, ...]
Layout = tuple[Seg, ...]


class Unsplittable(Exception):
    """A layout operation that the atom algebra cannot express."""


class Atoms:
    """The union-find forest; roots carry size, fixed reason, spatial flag and origin."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[str | None] = []
        self.spatial: list[bool] = []
        self.origin: list[str | None] = []
        self.split: dict[int, Layout] = {}

    # -- creation ---------------------------------------------------------------------
    def new(
        self, size: int, fixed: str | None = None, spatial: bool = False, origin: str | None = None
    ) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.fixed.append("spatial" if spatial and fixed is None else fixed)
        self.spatial.append(spatial)
        self.origin.append(origin)
        return len(self.parent) - 1

    def layout(self, size: int, **flags: object) -> Layout:
        """A one-atom layout of a fresh class (the empty segment for a size-1 dimension)."""
        if size == 1:
            return ((),)
        return ((self.new(size, **flags),),)  # type: ignore[arg-type]

    def _child(self, root: int, size: int) -> int:
        """A fresh class inheriting the flags of ``root`` (used by refinements)."""
        return self.new(size, self.fixed[root], self.spatial[root], self.origin[root])

    # -- queries ----------------------------------------------------------------------
    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def is_fixed(self, a: int) -> bool:
        return self.fixed[self.find(a)] is not None

    def seg_size(self, seg: Seg) -> int:
        return prod(self.size[self.find(a)] for a in seg)

    def layout_size(self, layout: Layout) -> int:
        return sum(self.seg_size(s) for s in layout)

    def expand(self, layout: Layout) -> Layout:
        """The layout in leaf classes (roots without refinement), size-1 atoms dropped.

        A concatenation-refined class inside a product (not outermost) cannot be written as
        segments; it is fixed and kept opaque.
        """
        out: list[Seg] = []
        for seg in layout:
            parts: list[Seg] = [()]
            for atom in seg:
                r = self.find(atom)
                if self.size[r] == 1:
                    continue
                sub = self.expand(self.split[r]) if r in self.split else ((r,),)
                if len(sub) == 1:
                    parts = [p + sub[0] for p in parts]
                elif parts == [()]:
                    parts = list(sub)
                else:
                    self.fix(r, "interleaved concatenation")
                    for p in parts:
                        for a in p:
                            self.fix(a, "interleaved concatenation")
                    parts = [p + (r,) for p in parts]
            out.extend(parts)
        return tuple(out)

    def leaves(self, layout: Layout) -> set[int]:
        return {a for seg in self.expand(layout) for a in seg}

    # -- constraints ------------------------------------------------------------------
    def fix(self, a: int, reason: str) -> None:
        """Mark the class of ``a`` (and every class it was refined into) as fixed."""
        r = self.find(a)
        if self.fixed[r] is None:
            self.fixed[r] = reason
        for seg in self.split.get(r, ()):
            for c in seg:
                if not self.is_fixed(c):
                    self.fix(c, reason)

    def fix_layout(self, layout: Layout, reason: str) -> None:
        for seg in layout:
            for a in seg:
                self.fix(a, reason)
        for seg in self.expand(layout):
            for a in seg:
                self.fix(a, reason)

    def union(self, a: int, b: int) -> None:
        """Tie two classes; refinements are reconciled.  Raises Unsplittable on conflict."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise Unsplittable(f"classes of sizes {self.size[ra]} and {self.size[rb]}")
        la, lb = self.split.get(ra), self.split.get(rb)
        if la is None and lb is not None:
            ra, rb, la, lb = rb, ra, lb, la
        if la is not None and lb is None:
            lb = self._mirror(rb, la)
        self.parent[rb] = ra
        self.spatial[ra] = self.spatial[ra] or self.spatial[rb]
        self.origin[ra] = self.origin[ra] or self.origin[rb]
        reason = self.fixed[ra] or self.fixed[rb]
        if la is not None and lb is not None:
            try:
                self.union_layouts(la, lb)
            except Unsplittable:
                self.fix_layout(lb, "conflicting refinements")
                self.fix(ra, "conflicting refinements")
                raise
        if reason is not None:
            self.fix(ra, reason)

    def _mirror(self, root: int, template: Layout) -> Layout:
        """Refine ``root`` with fresh classes of the same structure as ``template``."""
        layout = tuple(
            tuple(self._child(root, self.size[self.find(a)]) for a in seg) for seg in template
        )
        self.split[root] = layout
        return layout

    def union_layouts(self, x: Layout, y: Layout) -> None:
        """Make two equally long dimensions correspond position by position."""
        xs, ys = list(self.expand(x)), list(self.expand(y))
        if sum(map(self.seg_size, xs)) != sum(map(self.seg_size, ys)):
            raise Unsplittable("dimensions of different lengths")
        while xs and ys:
            a, b = xs[0], ys[0]
            na, nb = self.seg_size(a), self.seg_size(b)
            if na == nb:
                self._union_segs(a, b)
                del xs[0], ys[0]
            elif na > nb:
                xs[0:1] = self.cut(a, nb)
            else:
                ys[0:1] = self.cut(b, na)

    def leaf(self, a: int) -> int:
        r = self.find(a)
        if r in self.split:
            raise Unsplittable("an opaque (interleaved) class")
        return r

    def cut(self, seg: Seg, n: int) -> list[Seg]:
        """Split a segment into a head of ``n`` positions and the rest (outer atom split)."""
        if n % self.seg_size(seg[1:]) and all(self.is_fixed(a) for a in seg):
            # Fixed classes are never permuted: fresh fixed pieces need no link back.
            total = self.seg_size(seg)
            return [(self.new(n, "cut fixed axis"),), (self.new(total - n, "cut fixed axis"),)]
        head, rest = self.leaf(seg[0]), seg[1:]
        inner = self.seg_size(rest)
        if n % inner:
            raise Unsplittable("a cut inside a product of classes")
        k = n // inner
        first, second = self._child(head, k), self._child(head, self.size[head] - k)
        self.split[head] = ((first,), (second,))
        return [(first, *rest), (second, *rest)]

    def _union_segs(self, a: Seg, b: Seg) -> None:
        sa = [self.leaf(x) for x in a if self.size[self.find(x)] > 1]
        sb = [self.leaf(x) for x in b if self.size[self.find(x)] > 1]
        if [self.size[x] for x in sa] != [self.size[x] for x in sb]:
            cuts = sorted(cut_points(self, sa) | cut_points(self, sb))
            if any(hi % lo for lo, hi in zip(cuts, cuts[1:], strict=False)):
                if all(self.is_fixed(x) for x in sa + sb):
                    return
                raise Unsplittable("incompatible factorisations")
            sa, sb = self.refine_to(sa, cuts), self.refine_to(sb, cuts)
        for x, y in zip(sa, sb, strict=True):
            self.union(x, y)

    def refine_to(self, seg: list[int], cuts: list[int]) -> list[int]:
        """Refine each atom of a segment so its radix boundaries include ``cuts``."""
        out: list[int] = []
        inner = 1
        pieces: list[list[int]] = []
        for atom in reversed(seg):
            outer = inner * self.size[atom]
            inside = [c for c in cuts if inner < c < outer]
            bounds = [inner, *inside, outer]
            factors = [hi // lo for lo, hi in zip(bounds, bounds[1:], strict=False)][::-1]
            if len(factors) == 1:
                pieces.append([atom])
            else:
                kids = [self._child(atom, f) for f in factors]
                self.split[atom] = (tuple(kids),)
                pieces.append(kids)
            inner = outer
        for p in reversed(pieces):
            out.extend(p)
        return out


def cut_points(atoms: Atoms, seg: list[int]) -> set[int]:
    points, inner = set(), 1
    for a in reversed(seg):
        inner *= atoms.size[a]
        points.add(inner)
    return points | {1}
