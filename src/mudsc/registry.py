"""Named registries and declared parameters: what solvers, similarities and methods share.

A registry is an object, not a module dict, so that a caller (a test, an experiment) can
register an extra entry and take it out again, or work on a copy, without leaking into
anything else.  A ``Param`` is one tunable number of a solver or similarity, declared
once with its default and one line of help: the merge config, the method records and the
command line's help all read it from there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from mudsc.errors import ConfigError


@dataclass(frozen=True)
class Param:
    """One declared parameter: its name (a ``MergeConfig`` field), default and help."""

    name: str
    default: float
    help: str


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Entries found by name; unknown names fail with the list of valid ones."""

    def __init__(self, kind: str, plural: str, entries: Iterable[T] = ()) -> None:
        self.kind, self.plural = kind, plural
        self._entries: dict[str, T] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: T) -> T:
        """Add ``entry`` under its name (names are unique); returns it."""
        if entry.name in self._entries:
            article = "an" if self.kind[:1] in "aeiou" else "a"
            raise ConfigError(
                f"{article} {self.kind} named {entry.name!r} is already registered; "
                "pick another name"
            )
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Take the entry ``name`` out again (e.g. one a test registered)."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    def get(self, name: str) -> T:
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self._entries)}"
            )
        return entry

    def names(self) -> list[str]:
        return list(self._entries)

    def copy(self) -> Registry[T]:
        return Registry(self.kind, self.plural, self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
