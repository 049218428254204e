"""The one progress interface: every long-running function reports through it.

A ``Progress`` is any callable ``(stage, done, total, info)``; the library calls it and
never prints, the command line turns it into rich progress bars.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    """Reports that ``done`` of ``total`` steps of ``stage`` are finished (``info``: a note)."""

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None: ...


def quiet(stage: str, done: int, total: int, info: str = "") -> None:
    """The default sink: reports nothing (the library never prints)."""


def tracked(items: Sequence[T], stage: str, progress: Progress | None) -> Iterator[T]:
    """Yield ``items``, reporting each finished one to ``progress`` under ``stage``."""
    for i, item in enumerate(items):
        yield item
        if progress is not None:
            progress(stage, i + 1, len(items))


def counted(items: Iterable[T], stage: str, total: int, progress: Progress | None) -> Iterator[T]:
    """Like :func:`tracked` for an iterable whose length is known only to the caller."""
    for i, item in enumerate(items):
        yield item
        if progress is not None:
            progress(stage, i + 1, total)
