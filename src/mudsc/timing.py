"""One stopwatch for the pipeline's stages: ``with timer.stage("statistics"): ...``.

Seconds add up per stage name, so a stage entered many times (every solve is timed as
"assignment", inside "solve" and "sweeps") reports its total.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    """Wall-clock seconds per stage name, in the order the stages first ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
