"""The interface between the experiment runner and a kind of experiment (a task pool).

The runner owns what every experiment does alike (output folder, resumable records,
the merge loop, the report files); a pool says what differs: how its sources are made
and keyed, which sources are merged together on which calibration images, how a merge
is scored, and how the results read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from torch import Tensor, nn

from mudsc.experiments.config import MergeSettings
from mudsc.experiments.reports import ReportFiles
from mudsc.merge import MergeResult

T = TypeVar("T")


@dataclass(frozen=True)
class SourceJob(Generic[T]):
    """One source artefact to reuse or make.

    ``load`` returns the stored key and the artefact, or None when the folder holds no
    complete one; ``make`` trains and saves it atomically.
    """

    path: Path
    key: dict[str, Any]
    label: str
    load: Callable[[Path], tuple[Any, T] | None]
    make: Callable[[], T]


Ensure = Callable[[SourceJob[Any]], tuple[Any, bool]]  # -> (artefact, reused)
Score = Callable[[MergeResult], float]
Inputs = Callable[[MergeSettings], tuple[list[Tensor], Score]]


@dataclass
class MergeGroup:
    """Sources merged together with every method, and how each merge is judged.

    ``inputs`` gives, for one row's settings, the calibration batches and the score that
    ranks the candidates of ``alpha: auto`` (on images the statistics never saw); pools
    without variants return the same pair for every row.  ``evaluate`` gives the chosen
    merge's JSON-ready test numbers.  ``entry`` is the group's identification in
    results.json and ``rows`` the rows known before merging.
    """

    label: str
    folder: Path
    models: list[nn.Module]
    hashes: list[Any]
    key: dict[str, Any]
    inputs: Inputs
    evaluate: Callable[[MergeResult], dict[str, Any]]
    entry: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


class TaskPool(Protocol):
    """A kind of experiment, built from a validated config and its (subsampled) data."""

    row_keys: tuple[str, ...]  # what results.json keeps of each merge record

    def check(self) -> str:
        """Validate against the data before any work; a one-line summary of the plan."""
        ...

    def groups(self, out: Path, ensure: Ensure, force: bool) -> Iterator[MergeGroup]:
        """Make (through ``ensure``) the sources of each group, then yield the group."""
        ...

    def results(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        """The pool's part of results.json, given each group's entry with its rows."""
        ...

    def report(self, results: dict[str, Any]) -> ReportFiles:
        """results.md, results.csv and the results.png chart."""
        ...
