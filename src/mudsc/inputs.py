"""Checks on paths the user hands in, done before any byte is read.

A FIFO or a device named like a weights file would block or stream forever, and a symlink
loop would surface as "does not exist"; one check here turns each into a clear line.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from mudsc.errors import DataError, MudscError


def _stat(path: Path, what: str, error: type[MudscError]) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise error(f"{what} {path} is a broken symlink; point it at a real file") from None
        raise error(f"{what} {path} does not exist; check the path") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{what} {path} is a symlink loop; point it at a real file") from None
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None


def regular_file(path: str | Path, what: str = "file", error: type[MudscError] = DataError) -> Path:
    """``path`` if it is a readable regular file (after symlinks); one clear error if not."""
    path = Path(path)
    mode = _stat(path, what, error).st_mode
    if stat.S_ISDIR(mode):
        raise error(f"{what} {path} is a directory; name a file")
    if not stat.S_ISREG(mode):
        raise error(
            f"{what} {path} is not a regular file (a FIFO, socket or device); name a real file"
        )
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path} is not readable; check its permissions")
    return path


def existing_directory(
    path: str | Path, what: str = "directory", error: type[MudscError] = DataError
) -> Path:
    """``path`` if it is a directory (after symlinks); one clear error if not."""
    path = Path(path)
    if not stat.S_ISDIR(_stat(path, what, error).st_mode):
        raise error(f"{what} {path} is not a directory")
    return path
