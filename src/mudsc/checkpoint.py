"""Checkpoint directories: ``model.safetensors`` + ``head.safetensors`` + ``config.json``.

Writes are atomic (a temporary sibling directory renamed into place) so an interrupted run
never leaves something that looks finished, and an existing output is never replaced
unless the caller says ``force``.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mudsc import __version__
from mudsc.atomic import atomic_directory
from mudsc.errors import MudscError
from mudsc.models import create
from mudsc.models.head import ClassEmbeddingHead
from mudsc.partial import PartialMerge

MODEL_FILE = "model.safetensors"
HEAD_FILE = "head.safetensors"
CONFIG_FILE = "config.json"


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
        raise MudscError("only zoo models (mudsc.models.create) can be saved as checkpoints")
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
        save_file(state, str(tmp / MODEL_FILE))
        if head is not None:
            save_file(
                {"embeddings": head.embeddings.detach().cpu().contiguous()}, str(tmp / HEAD_FILE)
            )
        (tmp / CONFIG_FILE).write_text(json.dumps(full, indent=2, sort_keys=False))

    return atomic_directory(path, force, write)


def _read_state(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (
        SafetensorError, OSError, RuntimeError, ValueError, EOFError, KeyError,
        pickle.UnpicklingError,
    ) as exc:  # fmt: skip
        raise MudscError(
            f"cannot read {file}: the file is truncated or corrupt ({exc}); "
            "re-create it (mudsc train / mudsc merge) or copy it again"
        ) from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise MudscError(f"{file} does not hold a state dict of tensors")
    return dict(state)


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    arch: str | None = None,
    arch_args: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Load a checkpoint directory, or a plain state-dict file given the architecture."""
    path = Path(path)
    if not path.exists():
        raise MudscError(f"checkpoint {path} does not exist")
    if path.is_file():
        if arch is None:
            raise MudscError(
                f"{path} is a plain weights file; name its architecture with --arch "
                "(and its arguments with --arch-args)"
            )
        config: dict[str, Any] = {"arch": arch, "arch_args": dict(arch_args or {})}
        state = _read_state(path)
        head = None
    else:
        config_file = path / CONFIG_FILE
        if not config_file.exists():
            raise MudscError(f"{path} is not a mudsc checkpoint: it has no {CONFIG_FILE}")
        try:
            config = json.loads(config_file.read_text())
            config["arch"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MudscError(f"{config_file} is corrupt or incomplete ({exc!r})") from exc
        if not (path / MODEL_FILE).exists():
            raise MudscError(f"{path} has no {MODEL_FILE}: the checkpoint is incomplete")
        state = _read_state(path / MODEL_FILE)
        head = None
        if (path / HEAD_FILE).exists():
            emb = _read_state(path / HEAD_FILE).get("embeddings")
            if emb is None:
                raise MudscError(f"{path / HEAD_FILE} has no 'embeddings' tensor")
            head = ClassEmbeddingHead(emb, config=config.get("head"))
    if "partial" in config:
        model = _load_partial(config, state)
        model.to(device).eval()
        if head is not None:
            head.to(device)
        return Checkpoint(model=model, head=head, config=config, path=path)
    model = create(config["arch"], **config.get("arch_args", {}))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MudscError(
            f"the weights in {path} do not fit architecture {config['arch']!r} "
            f"with arguments {config.get('arch_args', {})}: {str(exc).splitlines()[0]}"
        ) from exc
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
