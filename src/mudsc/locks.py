"""One writer per output: an advisory ``flock`` on a lock file beside the destination.

The lock file ``.NAME.mudsc-lock`` lives only while its output is being written: the
holder deletes it before letting go, and whoever locks it checks that the name still
points at the file it locked (else the previous holder has just deleted it and it tries
again), so deleting never lets two writers in.  A run killed with SIGKILL leaves an
unlocked lock file, which the next writer of that output (or the experiment's clean-up)
removes.  The kernel drops a dead process's locks, so a lock never outlives its run.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from mudsc.errors import ResourceError

LOCK_SUFFIX = ".mudsc-lock"


def lock_path(path: Path) -> Path:
    """The lock file of the output ``path``: a hidden sibling."""
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


def _still_named(lock: Path, fd: int) -> bool:
    try:
        named = os.stat(lock)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _acquire(lock: Path) -> int | None:
    """A descriptor holding the exclusive lock on ``lock``, or None when someone has it."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise ResourceError(f"cannot create the lock file {lock}: {exc.strerror}; "
                                "check that its folder is writable") from None  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise ResourceError(f"cannot lock {lock}: {exc.strerror}; the file system must "
                                "support flock (use a local folder)") from None  # fmt: skip
        if _still_named(lock, fd):
            return fd
        os.close(fd)


def _release(lock: Path, fd: int) -> None:
    with suppress(OSError):
        os.unlink(lock)
    os.close(fd)


@contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold the lock of the output ``path`` for the block; one line if another run has it."""
    lock = lock_path(path)
    fd = _acquire(lock)
    if fd is None:
        raise ResourceError(f"another mudsc run is writing {path}; wait for it to finish or "
                            "choose another output")  # fmt: skip
    try:
        yield
    finally:
        _release(lock, fd)


def remove_if_stale(lock: Path) -> bool:
    """Delete the lock file ``lock`` when no run holds it (left by a killed run)."""
    fd = _acquire(lock)
    if fd is None:
        return False
    _release(lock, fd)
    return True
