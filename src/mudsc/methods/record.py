"""A method is a record of parts: which similarity, which solver, with what parameters.

Nothing about a method is decided by its name or by flags: the pipeline asks the
similarity what it needs (activation statistics, weight sweeps, alpha) and hands the
solver its declared parameters.  The record also carries what a user reads about it (a
description and the paper), so the command line's help is generated from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mudsc.errors import ConfigError
from mudsc.similarity import SIMILARITIES, Similarity
from mudsc.solvers import SOLVERS, Param, Solver


@dataclass(frozen=True)
class Method:
    """One merging method.  ``similarity`` names an entry of ``SIMILARITIES`` (None for a
    method whose solver reads no similarity, e.g. weight averaging); ``solver`` names an
    entry of ``SOLVERS``.  Both are checked when the record is made."""

    name: str
    description: str
    reference: str
    similarity: str | None
    solver: str

    def __post_init__(self) -> None:
        solver = SOLVERS.get(self.solver)
        if self.similarity is not None:
            SIMILARITIES.get(self.similarity)
        elif solver.needs_similarity:
            raise ConfigError(
                f"method {self.name!r}: solver {self.solver!r} needs a similarity; name one of "
                f"{', '.join(SIMILARITIES.names())}"
            )

    @property
    def solver_record(self) -> Solver:
        return SOLVERS.get(self.solver)

    @property
    def similarity_record(self) -> Similarity | None:
        """The similarity the method computes; None when its solver reads none."""
        if self.similarity is None or not self.solver_record.needs_similarity:
            return None
        return SIMILARITIES.get(self.similarity)

    @property
    def params(self) -> tuple[Param, ...]:
        """The parameters that change this method's result: its similarity's, then its
        solver's."""
        sim = self.similarity_record
        return (sim.params if sim else ()) + self.solver_record.params

    @property
    def needs_activations(self) -> bool:
        """Whether the method's similarity reads activation statistics (calibration data)."""
        sim = self.similarity_record
        return sim is not None and sim.activations

    @property
    def uses_alpha(self) -> bool:
        """Whether the method blends activation and weight similarity (alpha matters)."""
        sim = self.similarity_record
        return sim is not None and sim.uses_alpha

    @property
    def help(self) -> str:
        """A few lines for ``mudsc merge --help``: what it is, where from, its knobs."""
        parts = f"similarity {self.similarity}, " if self.similarity else ""
        lines = [f"{self.name}: {self.description} ({self.reference})",
                 f"    {parts}solver {self.solver}"]  # fmt: skip
        lines += [f"    {p.name} (default {p.default:g}): {p.help}"
                  for p in self.params]  # fmt: skip
        return "\n".join(lines)
