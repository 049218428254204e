"""Checkpoint directories: ``model.safetensors`` + ``head.safetensors`` + ``config.json``.

Writes are atomic (:mod:`mudsc.atomic`: a temporary sibling renamed into place) so an
interrupted run never leaves something that looks finished.  ``config.json`` records the
SHA-256 of every tensor file, checked on load, so a damaged file is reported
(:class:`~mudsc.errors.CorruptCheckpointError`) instead of evaluated; anything else that
makes a checkpoint unusable (missing, not mudsc's, another architecture) is a
:class:`~mudsc.errors.CheckpointError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from mudsc import __version__
from mudsc.atomic import atomic_directory
from mudsc.checkpoint_config import check_checkpoint_config
from mudsc.errors import CheckpointError, CorruptCheckpointError, MudscError
from mudsc.inputs import regular_file
from mudsc.models import create
from mudsc.models.head import ClassEmbeddingHead
from mudsc.partial import PartialMerge

MODEL_FILE = "model.safetensors"
HEAD_FILE = "head.safetensors"
CONFIG_FILE = "config.json"
HASHES = "sha256"  # config.json: {file name: SHA-256 hex digest of its bytes}
_REMAKE = "re-create it (mudsc train / mudsc merge) or copy it again"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its class head and everything config.json says."""

    model: torch.nn.Module
    head: ClassEmbeddingHead | None
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def tasks(self) -> list[list[int]]:
        """The class lists this model serves (one per source task)."""
        return [list(t) for t in self.config.get("tasks", [])]

    @property
    def dataset(self) -> str | None:
        return self.config.get("dataset")


def write_safetensors(tensors: Mapping[str, torch.Tensor], file: Path) -> str:
    """Write ``tensors`` in the safetensors format; returns the SHA-256 of the bytes written
    (hashed in memory, so the digest is of exactly what was meant to be on disk)."""
    data = save(dict(tensors))
    with open(file, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    config: Mapping[str, Any],
    head: ClassEmbeddingHead | None = None,
    force: bool = False,
) -> Path:
    """Save ``model`` (which must carry ``arch`` and ``config``) with ``config`` as provenance."""
    arch = config.get("arch", getattr(model, "arch", None))
    if arch is None:
        raise CheckpointError("only zoo models (mudsc.models.create) can be saved as checkpoints")
    full = {
        "mudsc_version": __version__,
        "arch": arch,
        "arch_args": dict(config.get("arch_args", getattr(model, "config", {}))),
        **dict(config),
    }
    if head is not None:
        full["head"] = head.to_config()
    if isinstance(model, PartialMerge):
        state, full["partial"] = model.to_record()
    else:
        state = model.state_dict()
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}

    def write(tmp: Path) -> None:
        hashes = {MODEL_FILE: write_safetensors(state, tmp / MODEL_FILE)}
        if head is not None:
            embeddings = {"embeddings": head.embeddings.detach().cpu().contiguous()}
            hashes[HEAD_FILE] = write_safetensors(embeddings, tmp / HEAD_FILE)
        record = {**full, HASHES: hashes}
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=False))

    return atomic_directory(path, force, write)


def _file_bytes(file: Path, what: str) -> bytes:
    regular_file(file, what, CheckpointError)  # a FIFO or a device would block or stream
    try:
        return file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror}") from None


def read_state(file: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``file``, checked against its recorded digest when there is one."""
    data = _file_bytes(file, "weights file")
    try:
        if file.suffix == ".safetensors":
            state: Any = load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (
        SafetensorError, OSError, RuntimeError, ValueError, EOFError, KeyError, OverflowError,
        pickle.UnpicklingError,
    ) as exc:  # fmt: skip
        raise CorruptCheckpointError(
            f"cannot read {file}: the file is truncated or corrupt ({exc}); {_REMAKE}"
        ) from exc
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptCheckpointError(
            f"{file} is damaged: its bytes differ from the SHA-256 recorded in {CONFIG_FILE}; "
            f"{_REMAKE}"
        )
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    return dict(state)


def _read_config(file: Path) -> dict[str, Any]:
    try:
        config = json.loads(_file_bytes(file, "checkpoint config"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{file} is corrupt or incomplete ({exc}); {_REMAKE}"
        ) from None
    if not isinstance(config, dict) or "arch" not in config:
        raise CheckpointError(f"{file} is incomplete: it names no architecture ('arch'), so "
                              f"{file.parent} is not a mudsc checkpoint")  # fmt: skip
    config = check_checkpoint_config(config, file)
    hashes = config.get(HASHES, {})
    if not (isinstance(hashes, Mapping) and all(isinstance(v, str) for v in hashes.values())):
        raise CorruptCheckpointError(f"{file}: '{HASHES}' is not a mapping of file digests; "
                                     f"{_REMAKE}")  # fmt: skip
    return config


def _read_directory(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """config.json, the model's tensors and the class head (or None) of a checkpoint folder."""
    config_file = path / CONFIG_FILE
    if not (config_file.exists() or config_file.is_symlink()):
        raise CheckpointError(f"{path} is not a mudsc checkpoint: it has no {CONFIG_FILE}")
    config = _read_config(config_file)
    hashes = config.get(HASHES, {})
    for name in {MODEL_FILE, *hashes}:
        if not ((path / name).exists() or (path / name).is_symlink()):
            raise CorruptCheckpointError(f"{path} has no {name}: the checkpoint is incomplete; "
                                         f"{_REMAKE}")  # fmt: skip
    state = read_state(path / MODEL_FILE, hashes.get(MODEL_FILE))
    head = None
    if (path / HEAD_FILE).exists():
        emb = read_state(path / HEAD_FILE, hashes.get(HEAD_FILE)).get("embeddings")
        if emb is None:
            raise CorruptCheckpointError(f"{path / HEAD_FILE} has no 'embeddings' tensor")
        head = ClassEmbeddingHead(emb, config=config.get("head"))
    return config, state, head


def _misfit(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor of ``state`` that does not fit ``model``: missing, extra or reshaped."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        return f"tensor {missing[0]!r} is missing"
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        return f"tensor {unexpected[0]!r} is not part of the architecture"
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            return (f"tensor {key!r} has shape {tuple(state[key].shape)}, the architecture "
                    f"needs {tuple(tensor.shape)}")  # fmt: skip
    return None


def _build(
    path: Path, config: Mapping[str, Any], state: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """The zoo model ``config`` describes, holding ``state``; one line when they differ."""
    arch, args = config["arch"], dict(config.get("arch_args", {}))
    try:
        model = create(arch, **args)
    except (MudscError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot build architecture {arch!r} with arguments "
                              f"{args}: {exc}") from None  # fmt: skip
    problem = _misfit(model, state)
    try:
        if problem is None:
            model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        problem = str(exc).splitlines()[0]
    if problem is not None:
        raise CheckpointError(f"the weights in {path} do not fit architecture {arch!r} with "
                              f"arguments {args}: {problem}")  # fmt: skip
    return model


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    arch: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Load a checkpoint directory, or a plain state-dict file given the architecture."""
    path = Path(path)
    if path.is_dir():
        config, state, head = _read_directory(path)
    else:
        regular_file(path, "checkpoint", CheckpointError)
        if arch is None:
            raise CheckpointError(
                f"{path} is a plain weights file; name its architecture with --arch "
                "(and its arguments with --arch-args)"
            )
        config = {"arch": arch, "arch_args": dict(arch_args or {})}
        state, head = read_state(path), None
    if "partial" in config:
        model: torch.nn.Module = _load_partial(config, state)
    else:
        model = _build(path, config, state)
    model.to(device).eval()
    if head is not None:
        head.to(device)
    return Checkpoint(model=model, head=head, config=config, path=path)


def _load_partial(config: Mapping[str, Any], state: dict[str, torch.Tensor]) -> PartialMerge:
    """Rebuild a partial merge (trunk + heads) from a fresh zoo model and its record."""
    args = dict(config.get("arch_args", {}))
    channels, size = int(args.get("in_channels", 3)), int(args.get("image_size", 32))
    example = torch.zeros(2, channels, size, size)
    return PartialMerge.from_record(
        lambda: create(config["arch"], **args), example, state, config["partial"]
    )
