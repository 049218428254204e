"""Termination signals as Python exceptions, so every ``finally`` of an atomic write runs.

``kill`` (SIGTERM, what schedulers and ``timeout`` send) would otherwise end the process
without unwinding, leaving its temporaries and lock files behind; as a
``KeyboardInterrupt`` it unwinds exactly like Ctrl-C.  The few instructions that swap an
output into place run with both signals deferred, so they never stop half-way.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

_DEFERRED = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signal.Signals(signum).name}")


def sigterm_as_keyboard_interrupt() -> bool:
    """Make SIGTERM raise ``KeyboardInterrupt`` (as Ctrl-C does); True when installed.

    Python lets only the main thread install handlers, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _interrupt)
    return True


def _redeliver(signum: int, handler: Any) -> None:
    """Act on a signal that arrived while deferred, as its own handler would have."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then act on the first one that came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    # A handler installed outside Python reads as None and could not be put back: keep it.
    ours = [sig for sig in _DEFERRED if signal.getsignal(sig) is not None]
    previous = {sig: signal.signal(sig, lambda s, f: pending.append(s)) for sig in ours}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            _redeliver(pending[0], previous[pending[0]])
