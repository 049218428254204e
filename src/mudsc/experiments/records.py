"""Resumable records: every finished unit of work is one atomic artefact carrying a key.

A unit is reused only when it loads completely and its key matches; ``.partial``
leftovers of an interrupted write are deleted, never read.  A key records the
configuration (a mismatch means the output folder belongs to another configuration:
refuse without ``force``) and the hashes of the inputs (a mismatch means a source was
re-made: redo silently).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mudsc.atomic import atomic_write_text
from mudsc.errors import MudscError

log = logging.getLogger(__name__)

PARTIAL = ".partial"


def clean_partials(root: Path) -> list[Path]:
    """Delete the ``.*.partial`` leftovers of interrupted atomic writes below ``root``."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for path in sorted(root.rglob(f".*{PARTIAL}"), reverse=True):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        log.info("removed unfinished %s", path)
    return removed


def state_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes): identifies a source."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def jsonable(value: Any) -> Any:
    """Tuples -> lists etc., so a key compares equal after a JSON round trip."""
    return json.loads(json.dumps(value))


def make_key(config: dict[str, Any], inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A record key: what was asked for (``config``) and what it was made from (``inputs``)."""
    return jsonable({"config": config, "inputs": inputs or {}})


def check_key(path: Path, found: Any, expected: dict[str, Any], force: bool) -> bool:
    """True when ``found`` is ``expected``; raise when the configuration part differs."""
    if found == expected:
        return True
    if isinstance(found, dict) and found.get("config") == expected["config"]:
        log.info("%s was made from other inputs; redoing it", path)
        return False
    if force:
        return False
    found_config = (found or {}).get("config", {}) or {}
    differing = sorted(
        k
        for k in set(expected["config"]) | set(found_config)
        if found_config.get(k) != expected["config"].get(k)
    )
    raise MudscError(
        f"{path} was made by a different configuration (differs in: "
        f"{', '.join(differing) or 'everything'}); use another output folder (-o) or pass "
        "--force to redo it"
    )


def read_record(path: Path, key: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """A finished per-unit JSON record for ``key``, or None when it must be (re)done."""
    if force or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        log.warning("%s is unreadable; redoing it", path)
        return None
    if not isinstance(record, dict) or record.get("complete") is not True:
        log.warning("%s is incomplete; redoing it", path)
        return None
    return record if check_key(path, record.get("key"), key, force) else None


def write_record(path: Path, key: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """Write a finished record atomically; the ``complete`` flag is its last proof of life."""
    record = {"key": key, **jsonable(payload), "complete": True}
    atomic_write_text(path, json.dumps(record, indent=2))
    return record
