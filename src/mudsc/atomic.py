"""Atomic outputs: a file or a directory appears whole under its final name, or not at all.

Everything mudsc writes (checkpoints, experiment records, reports, figures) goes through
here.  A write runs in a temporary sibling named ``.NAME.mudsc-PID-<random>.partial`` (so a
killed run's leftovers name mudsc and their owner), under the output's lock
(:mod:`mudsc.locks`), with its files and folders fsynced before one rename puts it in
place.  The existence rules are checked before the work and again under the lock right
before the rename:

* an existing output is replaced only when the caller says ``force``, and
* ``force`` replaces only what mudsc wrote (:func:`is_mudsc_output`); any other path is
  refused, so ``--force`` never deletes a user's file.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from mudsc.errors import ConfigError, ResourceError
from mudsc.locks import LOCK_SUFFIX, output_lock, remove_if_stale
from mudsc.signals import deferred_interrupts

PARTIAL = ".partial"
# What marks an output as mudsc's own (the only things --force may replace):
CHECKPOINT_CONFIG = "config.json"  # ... holding "mudsc_version" and "arch"
MERGE_CARD = "mudsc_merge.json"  # beside a Hugging Face model mudsc saved
EXPERIMENT_MARKER = ".mudsc-experiment"  # an experiment folder; everything below it
PNG_MARK = b"Software\x00mudsc"  # a tEXt chunk right after a figure's IHDR
ZIP_MARK = b"written by mudsc"  # the archive comment of an .npz data file
MIN_FREE_BYTES = 1 << 20  # a destination with less free space counts as full

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.mudsc-(?P<pid>\d+)-[^.]+" + re.escape(PARTIAL) + "$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_END = 8 + 4 + 4 + 13 + 4  # signature, length, type, IHDR data, CRC
_SMALL = 64 << 20  # marker files larger than this are not read (nor trusted)
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


# --- recognising mudsc's own outputs --------------------------------------------------


def mark_png(data: bytes) -> bytes:
    """A PNG with mudsc's ``Software`` text chunk inserted right after its header."""
    if data[:8] != _PNG_SIGNATURE:
        raise ValueError("not a PNG")
    chunk = b"tEXt" + PNG_MARK
    crc = zlib.crc32(chunk).to_bytes(4, "big")
    return data[:_IHDR_END] + len(PNG_MARK).to_bytes(4, "big") + chunk + crc + data[_IHDR_END:]


def mark_npz(data: bytes) -> bytes:
    """An .npz (a zip) with mudsc's archive comment; ``numpy.load`` ignores comments."""
    buffer = io.BytesIO(data)
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.comment = ZIP_MARK
    return buffer.getvalue()


def _regular(path: Path) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size <= _SMALL


def _head(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _tail(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - size))
        return f.read()


def _json_object(path: Path) -> dict | None:
    if not _regular(path):
        return None
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _own_file(path: Path) -> bool:
    """A figure (PNG chunk), an .npz (zip comment) or a figure's JSON data file mudsc wrote."""
    suffix = path.suffix.lower()
    if not _regular(path):
        return False
    if suffix == ".png":
        return _head(path, _IHDR_END + 8 + len(PNG_MARK))[_IHDR_END + 8 :] == PNG_MARK
    if suffix == ".npz":
        tail = _tail(path, 22 + len(ZIP_MARK))
        return tail.endswith(ZIP_MARK) and tail[:4] == b"PK\x05\x06"
    if suffix == ".json":  # no room for a mark: it belongs to the figure beside it
        return _json_object(path) is not None and _own_file(path.with_suffix(".png"))
    return False


def _own_directory(path: Path) -> bool:
    """Empty, or a checkpoint, a Hugging Face model or an experiment folder mudsc wrote."""
    if not any(path.iterdir()):
        return True
    config = _json_object(path / CHECKPOINT_CONFIG) or {}
    if "mudsc_version" in config and "arch" in config:
        return True
    return _json_object(path / MERGE_CARD) is not None or _regular(path / EXPERIMENT_MARKER)


def _inside_experiment(path: Path) -> bool:
    return any(_regular(folder / EXPERIMENT_MARKER) for folder in path.absolute().parents)


def is_mudsc_output(path: str | Path) -> bool:
    """Whether the existing ``path`` is something mudsc wrote (what ``--force`` may replace)."""
    path = Path(path)
    if path.is_symlink():
        return False
    if _inside_experiment(path):
        return True
    try:
        return _own_directory(path) if path.is_dir() else _own_file(path)
    except OSError:
        return False


# --- the checks before any work --------------------------------------------------------


def _check_name(path: Path) -> None:
    if path.name in ("", ".", ".."):
        raise ConfigError(f"output {str(path)!r} names an existing folder itself; name the new "
                          "output inside it, e.g. -o runs/merged")  # fmt: skip


def _check_destination(path: Path, force: bool) -> None:
    """The existence rules: absent, or ``force`` and written by mudsc."""
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise ConfigError(f"{path} already exists; choose another output or pass --force to "
                          "replace it")  # fmt: skip
    if not is_mudsc_output(path):
        raise ConfigError(f"{path} exists and mudsc did not write it; --force replaces only "
                          "mudsc's own outputs: choose another output or move it away")  # fmt: skip


def _check_file(path: Path, force: bool) -> None:
    """The rules for a file the caller names itself: replaced with ``force`` (never a folder)."""
    if path.is_dir() and not path.is_symlink():
        raise ConfigError(f"{path} is a folder; name a file to write")
    if not force and (path.exists() or path.is_symlink()):
        raise ConfigError(f"{path} already exists; choose another output or pass --force to "
                          "replace it")  # fmt: skip


def _reason(exc: OSError) -> str:
    return {
        errno.EROFS: "read-only",
        errno.EACCES: "not writable (permission denied)",
        errno.EPERM: "not writable (permission denied)",
        errno.ENOSPC: "full",
        errno.EDQUOT: "over its disk quota",
    }.get(exc.errno or 0, exc.strerror or str(exc))


def _nearest_existing(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def probe_writable(path: str | Path) -> None:
    """Fail now, not after the work, when nothing can be written where ``path`` goes."""
    path = Path(path)
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        raise ConfigError(f"cannot write {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=_prefix(path), suffix=PARTIAL, dir=folder)
        try:
            os.write(fd, b"mudsc")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        free = os.statvfs(folder)
    except OSError as exc:
        raise ResourceError(f"cannot write {path}: {folder} is {_reason(exc)}; choose another "
                            "output or fix its permissions / free space") from None  # fmt: skip
    if free.f_bavail * free.f_frsize < MIN_FREE_BYTES:
        raise ResourceError(f"cannot write {path}: {folder} is full "
                            f"({free.f_bavail * free.f_frsize} bytes free); free space or "
                            "choose another output")  # fmt: skip


def refuse_existing(path: str | Path, force: bool) -> None:
    """Fail before any work when ``path`` may not be written: it exists (and ``force`` is
    off, or mudsc did not write it), or its location is read-only or full."""
    path = Path(path)
    _check_name(path)
    _check_destination(path, force)
    probe_writable(path)


# --- temporaries and their leftovers ---------------------------------------------------


def _prefix(path: Path) -> str:
    return f".{path.name}.mudsc-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _leftover(name: str, output: str | None = None) -> bool:
    """Whether ``name`` is a temporary (of ``output``) whose writing process is dead."""
    match = _TEMPORARY.match(name)
    if match is None or (output is not None and match["name"] != output):
        return False
    return not _alive(int(match["pid"]))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete the temporaries that killed runs left beside the output ``path``."""
    path = Path(path)
    removed = [
        path.parent / e.name for e in os.scandir(path.parent) if _leftover(e.name, path.name)
    ]
    for leftover in removed:
        _remove(leftover)
    return removed


def remove_leftovers_below(root: str | Path) -> list[Path]:
    """Delete killed runs' temporaries and stale lock files anywhere below ``root`` (an
    experiment folder): only names mudsc makes, only of processes that are gone."""
    removed: list[Path] = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if _leftover(name) or (name.endswith(LOCK_SUFFIX) and remove_if_stale(path)):
                _remove(path)
                removed.append(path)
        dirs[:] = [d for d in dirs if (Path(folder) / d).is_dir()]
    return removed


# --- writing and committing ------------------------------------------------------------


def _mode(bits: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return bits & ~umask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle(tmp: Path) -> None:
    """Usual permissions (umask-respecting 0o666 / 0o777) and everything fsynced."""
    for folder, dirs, files in os.walk(tmp, topdown=False):
        for name in files:
            file = Path(folder) / name
            os.chmod(file, _mode(0o666))
            _fsync(file)
        for name in dirs:
            os.chmod(Path(folder) / name, _mode(0o777))
        _fsync(Path(folder))
    os.chmod(tmp, _mode(0o777 if tmp.is_dir() else 0o666))


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the platform or file system lacks it."""
    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, "renameat2", None)
    if call is None:
        return False
    at_cwd = -100
    if call(at_cwd, os.fsencode(src), at_cwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _exchange(tmp: Path, path: Path) -> None:
    """Swap ``tmp`` and ``path`` (``path`` never missing); ``tmp`` then holds the old one."""
    if _renameat2(tmp, path, _RENAME_EXCHANGE):
        return
    aside = path.parent / f"{_prefix(path)}aside{PARTIAL}"
    os.rename(path, aside)
    os.rename(tmp, path)
    os.rename(aside, tmp)


Check = Callable[[Path], None]  # raises when the existing output may not be replaced


def _commit(tmp: Path, path: Path, check: Check) -> None:
    """Check the rules once more (under the lock) and rename ``tmp`` into place."""
    with deferred_interrupts():
        check(path)
        if path.exists() or path.is_symlink():
            _exchange(tmp, path)
        elif not _renameat2(tmp, path, _RENAME_NOREPLACE):
            os.rename(tmp, path)
        _fsync(path.parent)


@contextmanager
def _output(path: Path, check: Check) -> Iterator[None]:
    """Checks, parent folders, the lock, the clean-up of leftovers; one line on OSError."""
    _check_name(path)
    check(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(path):
            remove_leftovers(path)
            check(path)
            yield
    except OSError as exc:
        kept = f"; {path} is unchanged" if path.exists() else ""
        raise ResourceError(f"cannot write {path}: {exc.strerror or exc}{kept}; free space or "
                            "choose another output") from exc  # fmt: skip


def atomic_directory(path: str | Path, force: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)``, then put ``tmp_dir`` in place as ``path`` in one rename."""
    path = Path(path)

    def check(p: Path) -> None:
        _check_destination(p, force)

    with _output(path, check):
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=PARTIAL, dir=path.parent))
        try:
            write(tmp)
            _settle(tmp)
            _commit(tmp, path, check)
        finally:
            _remove(tmp)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, force: bool = True) -> None:
    """Write a file through a temporary sibling and a rename, with the usual permissions.

    ``force`` (the default: callers rewrite their own files) replaces an existing file,
    never a folder; without it an existing file is refused at the rename.  Whether a
    user-named output may be replaced at all is :func:`refuse_existing`'s question.
    """
    path = Path(path)

    def check(p: Path) -> None:
        _check_file(p, force)

    with _output(path, check):
        fd, name = tempfile.mkstemp(prefix=_prefix(path), suffix=PARTIAL, dir=path.parent)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _mode(0o666))
            _commit(tmp, path, check)
        finally:
            _remove(tmp)


def atomic_write_text(path: str | Path, text: str, force: bool = True) -> None:
    """Write a text file atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"), force)
