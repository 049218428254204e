"""Resumable records: every finished unit of work is one atomic artefact carrying a key.

A unit is reused only when it loads completely and its key matches; the temporaries of
an interrupted write are deleted (:func:`mudsc.atomic.remove_leftovers_below`), never
read.  A key records the configuration (a mismatch means the output folder belongs to
another configuration: refuse without ``force``) and the hashes of the inputs (a
mismatch means a source was re-made: redo silently).  The folder itself carries the
experiment's key in its marker file, checked before anything is written into it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mudsc.atomic import EXPERIMENT_MARKER, atomic_write_text
from mudsc.errors import ConfigError

log = logging.getLogger(__name__)


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
    raise ConfigError(
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


def _marker_key(out: Path) -> Any:
    """The key in the folder's marker file (None when it is unreadable)."""
    try:
        marker = json.loads((out / EXPERIMENT_MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return marker.get("key") if isinstance(marker, dict) else None


def claim_folder(out: Path, key: dict[str, Any], force: bool) -> None:
    """Refuse ``out`` unless it is absent, empty or this experiment's own folder (its
    marker holds ``key``; another experiment's folder needs ``force``).  Reads only."""
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise ConfigError(f"output folder {out} exists and is not a folder; choose another "
                          "output_dir (-o)")  # fmt: skip
    if not any(out.iterdir()):
        return
    if not (out / EXPERIMENT_MARKER).is_file():
        raise ConfigError(
            f"{out} exists and is not a mudsc experiment folder (no {EXPERIMENT_MARKER}); "
            "mudsc writes only into folders it made, even with --force: choose another "
            "output_dir (-o)"
        )
    check_key(out, _marker_key(out), key, force)


def write_marker(out: Path, name: str, key: dict[str, Any]) -> None:
    """Mark ``out`` as the experiment ``key``'s folder (what ``--force`` may replace)."""
    atomic_write_text(out / EXPERIMENT_MARKER, json.dumps({"experiment": name, "key": key}))
