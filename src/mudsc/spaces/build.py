"""From recorded layouts to a :class:`MergeSpec`: spaces, groups, ties, taps and names.

Every segment of a recorded layout lands on a *key*: its free (non-fixed) classes, at
most two.  One class is a plain space; two classes ``(A, B)`` are a grouped space of
``|A|`` blocks of ``|B|`` units (attention heads after a reshape), allowed only if
every op treats ``A`` as a batch axis whenever ``B`` is used on its own, so that units
may be permuted independently inside each block.  Fixed atoms outside the key repeat
the member (one member per position), fixed atoms inside it become ``inner``.

Anything that does not fit is resolved by fixing classes (never by guessing) and the
passes repeat until nothing changes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from math import prod

from mudsc.spaces.atoms import Atoms, Layout
from mudsc.spaces.context import Records
from mudsc.spaces.naming import SpaceFacts, block_tie_name, space_names
from mudsc.spaces.spec import Member, MergeSpec, Space, Tap

log = logging.getLogger(__name__)

Key = tuple[int, ...]


@dataclass(frozen=True)
class Place:
    """Where one segment of a layout lands: its key and how it sits on the axis.

    The key's units sit ``inner`` positions apart from ``offset``, repeated ``outer``
    times (each repeat ``key_size * inner`` positions further); ``free``: not fixed.
    """

    key: Key
    offset: int
    outer: int
    inner: int
    free: bool
    key_size: int = 1


def places(atoms: Atoms, layout: Layout) -> list[Place]:
    """Where each segment of ``layout`` lands (segments of size-1 classes only are skipped)."""
    out, offset = [], 0
    for seg in atoms.expand(layout):
        n = atoms.seg_size(seg)
        roots = [r for r in (atoms.find(a) for a in seg) if atoms.size[r] > 1]
        if roots:
            out.append(_place(atoms, roots, offset))
        offset += n
    return out


def _place(atoms: Atoms, roots: list[int], offset: int) -> Place:
    sizes = [atoms.size[r] for r in roots]
    free = [i for i, r in enumerate(roots) if not atoms.is_fixed(r)]
    if not free:
        return Place(tuple(roots), offset, 1, 1, False, prod(sizes))
    lo, hi = free[0], free[-1]
    key = tuple(roots[lo : hi + 1])
    return Place(
        key, offset, prod(sizes[:lo]), prod(sizes[hi + 1 :]), True, prod(sizes[lo : hi + 1])
    )


@dataclass
class _Entry:
    key: Key
    size: int
    fixed: bool
    order: tuple[int, int]
    roles: dict[str, dict[Member, None]] = field(
        default_factory=lambda: {"producer": {}, "consumer": {}, "ignored": {}}
    )
    taps: dict[str, dict[Tap, None]] = field(default_factory=lambda: defaultdict(dict))


class _KeyForest:
    """Union-find over keys: the keys of one tree share one block order."""

    def __init__(self) -> None:
        self.parent: dict[Key, Key] = {}

    def find(self, k: Key) -> Key:
        while self.parent.get(k, k) != k:
            k = self.parent[k]
        return k

    def join(self, k: Key, other: Key) -> None:
        self.parent[self.find(k)] = self.find(other)

    def groups(self) -> dict[Key, list[Key]]:
        """Every key seen, by its root."""
        groups: dict[Key, list[Key]] = defaultdict(list)
        for k in set(self.parent) | set(self.parent.values()):
            groups[self.find(k)].append(k)
        return groups


def build(atoms: Atoms, records: Records) -> tuple[MergeSpec, dict[str, Key]]:
    """Turn the analysis of one traced model into its merge spec, with each space's key.

    ``atoms`` are left in their final state: :func:`places` of any recorded layout then
    lands on the keys returned.
    """
    return _Builder(atoms, records).run()


class _Builder:
    def __init__(self, atoms: Atoms, records: Records) -> None:
        self.atoms, self.records = atoms, records
        self.key_groups: dict[Key, int] = {}
        self.ties: dict[Key, Key] = {}
        self.tie_names: dict[Key, str] = {}

    def places(self, layout: Layout) -> list[Place]:
        return places(self.atoms, layout)

    def _layouts(self) -> list[Layout]:
        return [r.layout for r in self.records.members] + [t.layout for t in self.records.taps]

    def _fix(self, roots: list[int] | Key, reason: str) -> None:
        for r in roots:
            self.atoms.fix(r, reason)

    def _note(self, message: str, layouts: list[Layout]) -> None:
        self.records.fixed_by.append((message, layouts))

    # -- passes -------------------------------------------------------------------------
    def run(self) -> tuple[MergeSpec, dict[str, Key]]:
        for _ in range(1000):
            changed = self._structure()
            changed = self._pairs() or changed
            changed = self._per_group() or changed
            changed = self._groups() or changed
            changed = self._tie_pass() or changed
            if not changed:
                break
        return self._assemble()

    def _structure(self) -> bool:
        """A key is a contiguous run of at most two free classes; fix the outer rest."""
        changed = False
        for layout in self._layouts():
            for seg in self.atoms.expand(layout):
                roots = [r for r in (self.atoms.find(a) for a in seg) if self.atoms.size[r] > 1]
                free = [i for i, r in enumerate(roots) if not self.atoms.is_fixed(r)]
                if not free:
                    continue
                run_start = free[-1]
                while run_start - 1 in free:
                    run_start -= 1
                keep = max(run_start, free[-1] - 1)
                outer = [roots[i] for i in free if i < keep]
                if outer:
                    self._fix(outer, "a dimension that mixes more than two merge classes")
                    changed = True
        return changed

    def _pair_keys(self) -> tuple[set[Key], set[int]]:
        pairs, singles = set(), set()
        for layout in self._layouts():
            for p in self.places(layout):
                if p.free and len(p.key) == 2:
                    pairs.add(p.key)
                elif p.free:
                    singles.add(p.key[0])
        return pairs, singles

    def _pairs(self) -> bool:
        """Keep a grouped key (A, B) only if A is a pure block index; else fix A."""
        pairs, singles = self._pair_keys()
        if not pairs:
            return False
        outer_of: dict[int, set[int]] = defaultdict(set)
        for a, b in pairs:
            outer_of[b].add(a)
        outers = {a for a, _ in pairs}
        inners = {b for _, b in pairs}
        bad = set()
        for a, b in pairs:
            if a in singles or b in singles or a in inners or b in outers or len(outer_of[b]) > 1:
                bad |= outer_of[b]
            elif not self._decoupled(a, b):
                bad.add(a)
        for a in bad:
            log.info("merge class %d: block order fixed (not a pure head axis)", a)
            self._fix([a], "not a pure block axis")
        return bool(bad)

    def _decoupled(self, a: int, b: int) -> bool:
        """Whether units of B may be permuted independently inside each block of A."""
        for dims in self.records.tensors:
            leaves = {x for d in dims for x in self.atoms.leaves(d)}
            if b in leaves and a not in leaves:
                return False
        for dims, axis in self.records.mixes:
            others = {x for k, d in enumerate(dims) if k != axis for x in self.atoms.leaves(d)}
            for seg in self.atoms.expand(dims[axis]):
                roots = [r for r in (self.atoms.find(x) for x in seg) if self.atoms.size[r] > 1]
                for i, r in enumerate(roots):
                    if r == b and not (i > 0 and roots[i - 1] == a) and a not in others:
                        return False
                    if r == a and not (i + 1 < len(roots) and roots[i + 1] == b) and b in others:
                        return False
        return True

    def _single_free(self, layout: Layout) -> Place | None | bool:
        """The one free place covering the whole layout; None if all fixed; False if neither."""
        places = self.places(layout)
        free = [p for p in places if p.free]
        if not free:
            return None
        total = self.atoms.layout_size(layout)
        p = free[0]
        if len(places) == 1 and p.outer == 1 and p.inner == 1 and p.key_size == total:
            return p
        return False

    def _per_group(self) -> bool:
        changed = False
        for rec in self.records.members:
            if rec.per_group and self._single_free(rec.layout) is False:
                self.atoms.fix_layout(rec.layout, "grouped input that is not one space")
                self._note(f"{rec.tensor}: grouped convolution input is not a single space",
                           [rec.layout])  # fmt: skip
                changed = True
        return changed

    def _groups(self) -> bool:
        changed = False
        wanted: dict[Key, set[int]] = defaultdict(set)
        origins: dict[Key, list[str]] = defaultdict(list)
        for layout, groups, origin in self.records.groups:
            place = self._single_free(layout)
            if place is None:
                continue
            if place is False:
                self.atoms.fix_layout(layout, "groups across several spaces")
                self._note(f"{origin}: {groups} groups span several spaces", [layout])
                changed = True
                continue
            wanted[place.key].add(groups)
            origins[place.key].append(origin)
        pairs, _ = self._pair_keys()
        for a, b in pairs:
            wanted[(a, b)].add(self.atoms.size[a])
        self.key_groups = {}
        for key, values in wanted.items():
            size = prod(self.atoms.size[r] for r in key)
            real = {g for g in values if g > 1}
            if len(real) > 1:
                real.discard(size)  # blocks of one unit constrain nothing on their own
            if any(size % g for g in real) or len(real) > 1:
                self._fix(key, "incompatible group structures")
                where = ", ".join(sorted(set(origins[key]))) or "attention heads"
                self._note(
                    f"{where}: incompatible group counts {sorted(real)} on one space",
                    [((r,),) for r in key],
                )
                changed = True
            else:
                self.key_groups[key] = real.pop() if real else 1
        return changed

    def _tie_pass(self) -> bool:
        """Join the keys that share one block order (rule ties, head pairs on one block
        class) into block ties; fix ties that cannot hold."""
        forest = _KeyForest()
        changed, names = self._recorded_ties(forest)
        self._tie_shared_blocks(forest)
        self.ties, self.tie_names = {}, {}
        for root, keys in forest.groups().items():
            if len(keys) >= 2:
                changed = self._settle_tie(root, keys, names) or changed
        return changed

    def _recorded_ties(self, forest: _KeyForest) -> tuple[bool, dict[Key, str]]:
        """Join the ties rules recorded; a tie to a fixed space fixes both sides."""
        names: dict[Key, str] = {}
        changed = False
        for x, y, name in self.records.ties:
            px, py = self._single_free(x), self._single_free(y)
            if isinstance(px, Place) and isinstance(py, Place):
                forest.join(px.key, py.key)
                names.setdefault(px.key, name)
            elif px is not None or py is not None:
                for layout in (x, y):
                    self.atoms.fix_layout(layout, "tied to a fixed space")
                self._note(f"{name}: block order tied to a fixed space", [x, y])
                changed = True
        return changed, names

    def _tie_shared_blocks(self, forest: _KeyForest) -> None:
        """Head-grouped keys (A, B) with the same block class A share its order."""
        pairs, _ = self._pair_keys()
        by_outer: dict[int, list[Key]] = defaultdict(list)
        for key in sorted(pairs):
            by_outer[key[0]].append(key)
        for keys in by_outer.values():
            for k in keys[1:]:
                forest.join(k, keys[0])

    def _settle_tie(self, root: Key, keys: list[Key], names: dict[Key, str]) -> bool:
        """Record one block tie; tied spaces with different block counts are fixed."""
        sizes = {self.key_groups.get(k, 1) for k in keys}
        if len(sizes) > 1:
            for k in keys:
                self._fix(k, "tied spaces with different block counts")
            self._note(
                "tied spaces with different block counts", [((r,),) for k in keys for r in k]
            )
            return True
        for k in keys:
            self.ties[k] = root
        label = next((names[k] for k in keys if k in names), None)
        if label:
            self.tie_names[root] = label
        return False

    # -- assembly -----------------------------------------------------------------------
    def _assemble(self) -> tuple[MergeSpec, dict[str, Key]]:
        entries: dict[Key, _Entry] = {}
        for idx, rec in enumerate(self.records.members):
            for p in self.places(rec.layout):
                entry = self._entry(entries, p, (rec.order, idx))
                for o in range(p.outer):
                    start = p.offset + o * p.key_size * p.inner
                    member = Member(rec.tensor, rec.axis, start, p.inner, rec.per_group)
                    entry.roles[rec.role][member] = None
        for rec in self.records.taps:
            for p in self.places(rec.layout):
                if not p.free or p.outer != 1 or p.key not in entries:
                    continue
                tap = Tap(
                    rec.module, rec.side, rec.axis, p.offset, p.inner, rec.arg,
                    rec.project_weight, rec.project_bias, rec.project_start,
                )  # fmt: skip
                entries[p.key].taps["producer" if rec.kind == "producer" else "consumer"][tap] = (
                    None
                )
        ordered = sorted(entries.values(), key=lambda e: e.order)
        self.landing = {
            "hint": self._landing(self.records.hints),
            "residual": self._landing(self.records.residuals),
        }
        facts = [self._facts(e) for e in ordered]
        names = space_names(facts)
        tie_labels = {
            root: self.tie_names.get(root) or block_tie_name(names, facts, root)
            for root in set(self.ties.values())
        }
        spaces = []
        for e, name in zip(ordered, names, strict=True):
            taps = e.taps.get("consumer") or e.taps.get("producer") or {}
            root = self.ties.get(e.key)
            spaces.append(
                Space(
                    name=name,
                    size=e.size,
                    groups=1 if e.fixed else self.key_groups.get(e.key, 1),
                    producers=tuple(e.roles["producer"]),
                    consumers=tuple(e.roles["consumer"]),
                    ignored=tuple(e.roles["ignored"]),
                    taps=tuple(taps) if not e.fixed else (),
                    fixed=e.fixed,
                    block_tie=tie_labels[root] if root is not None and not e.fixed else None,
                )
            )
        keys = {name: e.key for e, name in zip(ordered, names, strict=True)}
        return MergeSpec(tuple(spaces), tuple(self._warnings(ordered, names))), keys

    def _entry(self, entries: dict[Key, _Entry], p: Place, order: tuple[int, int]) -> _Entry:
        if p.key not in entries:
            entries[p.key] = _Entry(p.key, p.key_size, not p.free, order)
        entry = entries[p.key]
        entry.order = min(entry.order, order)
        return entry

    def _facts(self, e: _Entry) -> SpaceFacts:
        origins = {self.atoms.origin[r] for r in e.key}
        hints = self.landing["hint"].get(e.key, [])
        scopes = self.landing["residual"].get(e.key, [])
        return SpaceFacts(
            key=e.key,
            fixed=e.fixed,
            origin="output" if "output" in origins else "input" if "input" in origins else None,
            producers=[m.tensor for m in e.roles["producer"]],
            consumers=[m.tensor for m in e.roles["consumer"]],
            hint=hints[0] if hints else None,
            residual_scopes=scopes,
            head_pair=len(e.key) == 2 and e.key in self.ties,
            tie=self.ties.get(e.key),
        )

    def _landing(self, notes: list[tuple[Layout, str]]) -> dict[Key, list[str]]:
        """For each key, the labels of the noted layouts that land on it."""
        out: dict[Key, list[str]] = defaultdict(list)
        for layout, label in notes:
            for key in dict.fromkeys(p.key for p in self.places(layout)):
                out[key].append(label)
        return out

    def _warnings(self, ordered: list[_Entry], names: list[str]) -> list[str]:
        """One line per recorded reason, naming every space it fixed (all of them)."""
        owner = {r: name for e, name in zip(ordered, names, strict=True) for r in e.key}
        fixed = {name for e, name in zip(ordered, names, strict=True) if e.fixed}
        out: list[str] = []
        for message, layouts in self.records.fixed_by:
            hit = {owner[r] for layout in layouts for r in self.atoms.leaves(layout) if r in owner}
            hit &= fixed
            if not hit:  # a constant (a mask, position ids): no merge space is affected
                log.info("%s (no merge space affected)", message)
                continue
            text = f"{message}; spaces fixed: {', '.join(sorted(hit))}"
            if text not in out:
                out.append(text)
        return out
