"""Thread policy: how many CPU threads torch uses, and how its OpenMP threads wait.

On a machine whose cores are shared with other work, torch's defaults misbehave: it starts
one intra-op thread per core the machine *has* (``os.cpu_count``), not per core this
process *may use* (``os.sched_getaffinity``: containers, ``taskset``), and its OpenMP
runtime (GNU libgomp in the pip wheels) spins 300,000 iterations at every barrier
before sleeping.  When another process holds a core, each parallel region waits for its
slowest thread to be scheduled again, and spinning threads steal the cycles the others need:
small stages (trace, apply) then run 30-100x slower instead of in proportion to the load.

Two calls, both idempotent:

* ``prepare_environment()``: sets a short OpenMP spin before sleeping (``GOMP_SPINCOUNT``,
  ``KMP_BLOCKTIME``) unless the user set them or chose ``OMP_WAIT_POLICY``.  The OpenMP
  runtime reads these once, when it is loaded, so this only works *before* ``import torch``
  (the console entry point calls it first); afterwards it changes nothing and says so.
* ``configure_threads()``: sets torch's intra-op thread count to the cores this process may
  use, or to ``MUDSC_THREADS`` / ``OMP_NUM_THREADS`` when set.  Works at any time.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping

from mudsc.errors import ConfigError

log = logging.getLogger(__name__)

SHORT_WAIT = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "1"}
"""OpenMP wait settings: an idle thread spins ~1,000 iterations (libgomp, the runtime of
the pip wheels: microseconds) before it sleeps, instead of libgomp's default 300,000; the
value libgomp itself falls back to when it sees more threads than cores.  Back-to-back
small ops still find their threads awake, and a thread whose core is wanted elsewhere gives
it up at once.  ``OMP_WAIT_POLICY=PASSIVE`` (no spinning) was as good under load but made
the idle weight sweeps 1.5x slower; 10,000 kept half the slowdown under load.
``KMP_BLOCKTIME`` (ms) is the nearest setting of Intel's libiomp (not measured)."""

_THREAD_VARIABLES = ("MUDSC_THREADS", "OMP_NUM_THREADS")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def thread_count(environ: Mapping[str, str] | None = None) -> int:
    """The intra-op thread count to use: ``MUDSC_THREADS``, else ``OMP_NUM_THREADS``,
    else the usable cores; an explicit value is honoured as given (the user knows their
    machine), the default never exceeds the affinity count."""
    env = os.environ if environ is None else environ
    for name in _THREAD_VARIABLES:
        raw = env.get(name, "").strip()
        if not raw:
            continue
        try:
            value = int(raw.split(",")[0])  # OMP_NUM_THREADS may list nested levels
        except ValueError:
            raise ConfigError(
                f"{name}={raw!r} is not a whole number; set it to a thread count such as 1"
            ) from None
        if value < 1:
            raise ConfigError(f"{name}={raw!r} must be at least 1; set it to a thread count")
        return value
    return usable_cores()


def prepare_environment(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set the short OpenMP wait where the user has not chosen a wait policy.  Returns
    True when it can still take effect (torch not imported yet), False otherwise."""
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env:
        for name, value in SHORT_WAIT.items():
            env.setdefault(name, value)
    if environ is None and "torch" in sys.modules:
        log.debug("torch is already imported: its OpenMP wait policy is fixed")
        return False
    return True


def configure_threads(environ: Mapping[str, str] | None = None) -> int:
    """Set torch's intra-op thread count by ``thread_count``; returns the count.  Calling
    it again with the same environment changes nothing."""
    import torch

    count = thread_count(environ)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    log.debug("torch intra-op threads: %d", count)
    return count
