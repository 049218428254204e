"""Class splits: which classes each separately trained model sees (its "task")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mudsc.errors import ConfigError


def _parse_ints(spec: str, separator: str, what: str, example: str) -> list[int]:
    parts = [part.strip() for part in spec.split(separator)]
    if not spec.strip() or any(not part.lstrip("-").isdigit() for part in parts):
        raise ConfigError(f"cannot parse {what} {spec!r}: write integers like {example!r}")
    return [int(part) for part in parts]


def parse_split(spec: str) -> list[int]:
    """``"5+5"`` -> ``[5, 5]``: the number of classes given to each model."""
    sizes = _parse_ints(spec, "+", "class split", "5+5")
    if any(size <= 0 for size in sizes):
        raise ConfigError(f"class split {spec!r}: every task needs at least one class")
    return sizes


def parse_classes(spec: str) -> list[int]:
    """``"0,2,4,6,8"`` -> ``[0, 2, 4, 6, 8]`` (validate against a dataset separately)."""
    return _parse_ints(spec, ",", "class list", "0,2,4,6,8")


def validate_classes(classes: Sequence[int], num_classes: int) -> list[int]:
    """Check a class list against a dataset's class count; returns it as a list of ints."""
    ids = [int(c) for c in classes]
    valid = f"valid class ids are 0..{num_classes - 1}"
    if not ids:
        raise ConfigError(f"the class list is empty; {valid}")
    bad = sorted({c for c in ids if not 0 <= c < num_classes})
    if bad:
        raise ConfigError(f"class ids {bad} are out of range; {valid}")
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise ConfigError(f"class ids {duplicates} are listed more than once; {valid}")
    return ids


def split_classes(num_classes: int, sizes: Sequence[int], seed: int) -> list[list[int]]:
    """Disjoint random class sets of the given sizes, from a seeded permutation.

    Each set is sorted, so a task's identity depends only on its classes, not their order.
    """
    if any(size <= 0 for size in sizes) or not sizes:
        raise ConfigError(f"class split {list(sizes)}: every task needs at least one class")
    if sum(sizes) > num_classes:
        raise ConfigError(
            f"class split {'+'.join(map(str, sizes))} needs {sum(sizes)} classes but the "
            f"dataset has only {num_classes}"
        )
    order = np.random.default_rng(seed).permutation(num_classes).tolist()
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    return [sorted(order[start : start + size]) for start, size in zip(starts, sizes, strict=True)]
