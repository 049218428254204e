"""Free memory of a merge device, without third-party packages.

CPU: the smaller of the kernel's MemAvailable (page cache counts as free, as it is
reclaimable) and the room left under a cgroup v2 limit (a container's real ceiling);
``os.sysconf`` free pages where /proc is missing.  CUDA: ``torch.cuda.mem_get_info``.
None when it cannot be told (the memory check is then skipped, not guessed).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_MEMINFO = Path("/proc/meminfo")
_CGROUP = Path("/sys/fs/cgroup")


def _meminfo_available() -> int | None:
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _sysconf_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((_CGROUP / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes a merge on ``device`` can still allocate (None when unknown)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type != "cpu":
        return None
    host = _meminfo_available()
    host = host if host is not None else _sysconf_available()
    room = _cgroup_room()
    known = [v for v in (host, room) if v is not None]
    return min(known) if known else None
