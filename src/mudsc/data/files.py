"""Input tensors from a file: calibration inputs for any model, labelled sets for scoring.

Models outside the zoo (token-id transformers, a user's own image model) have no dataset
of the registry to draw from, so the user hands over the inputs themselves, as the model
takes them (token ids, or images already normalised). One reader checks every format
the same way, so a mistake is one clear line before any model is touched.

Formats: ``.pt`` (``torch.load(weights_only=True)``: a tensor, or a dict with ``inputs``
and optional ``labels``), ``.safetensors`` (keys ``inputs``, optional ``labels``),
``.npz`` (the same keys) and ``.npy`` (one array: inputs only).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mudsc.errors import MudscError

FORMATS = (".pt", ".safetensors", ".npz", ".npy")


@dataclass(frozen=True)
class TensorFile:
    """Inputs (first axis: examples) and their integer class labels, or None."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    path: Path

    def __len__(self) -> int:
        return len(self.inputs)

    def head(self, size: int | None) -> TensorFile:
        """The first ``size`` examples (all of them for None)."""
        if size is None:
            return self
        if not 0 < size <= len(self):
            raise MudscError(f"asked for {size} examples but {self.path} holds {len(self)}; "
                             f"choose 1..{len(self)}")  # fmt: skip
        labels = None if self.labels is None else self.labels[:size]
        return TensorFile(self.inputs[:size], labels, self.path)


def read_tensor_file(path: str | Path, *, labelled: bool = False) -> TensorFile:
    """Read and check ``path``; with ``labelled`` the file must carry labels too."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise MudscError(f"{path}: unknown input-file format {path.suffix!r}; "
                         f"use one of {', '.join(FORMATS)}")  # fmt: skip
    if not path.is_file():
        raise MudscError(f"input file {path} does not exist")
    entries = _read_entries(path)
    if "inputs" not in entries:
        raise MudscError(f"{path} has no 'inputs' tensor (found: {', '.join(entries) or 'none'})")
    inputs = _check_inputs(path, entries["inputs"])
    labels = entries.get("labels")
    if labels is not None:
        labels = _check_labels(path, labels, len(inputs))
    elif labelled:
        how = "a .npy file holds inputs only" if path.suffix == ".npy" else "it has none"
        raise MudscError(f"{path} needs a 'labels' tensor to score a model ({how}); save "
                         "{'inputs': x, 'labels': y} as .pt, .safetensors or .npz")  # fmt: skip
    return TensorFile(inputs, labels, path)


def split_batches(inputs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``inputs`` cut into consecutive batches of ``batch_size`` (the last may be smaller)."""
    if batch_size <= 0:
        raise MudscError(f"batch size must be positive, got {batch_size}")
    return [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]


def _read_entries(path: Path) -> dict[str, Any]:
    """The file's named arrays, as tensors (a bare tensor or array is the inputs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        if path.suffix == ".npy":
            return {"inputs": _from_numpy(np.load(path, allow_pickle=False))}
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {k: _from_numpy(archive[k]) for k in archive.files}
        value = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, TypeError,
            pickle.UnpicklingError) as exc:  # fmt: skip
        raise MudscError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                         " (is it truncated, or another format?)") from exc  # fmt: skip
    if isinstance(value, torch.Tensor):
        return {"inputs": value}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    raise MudscError(f"{path} holds a {type(value).__name__}; save a tensor of inputs or a "
                     "dict {'inputs': x, 'labels': y}")  # fmt: skip


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind not in "biuf":
        raise ValueError(f"array of dtype {array.dtype} is not numeric")
    return torch.from_numpy(np.ascontiguousarray(array))


def _check_inputs(path: Path, inputs: Any) -> torch.Tensor:
    """Token ids become int64, images float32; anything else is refused."""
    if not isinstance(inputs, torch.Tensor):
        raise MudscError(f"{path}: 'inputs' is a {type(inputs).__name__}, not a tensor")
    if inputs.dim() == 0 or len(inputs) == 0:
        raise MudscError(f"{path} holds no examples ('inputs' has shape {tuple(inputs.shape)})")
    if inputs.is_floating_point():
        return inputs.float()
    if inputs.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        return inputs.long()
    raise MudscError(f"{path}: 'inputs' has dtype {inputs.dtype}; use integer token ids or "
                     "floating-point images")  # fmt: skip


def _check_labels(path: Path, labels: Any, count: int) -> torch.Tensor:
    """One integer class per example."""
    if not isinstance(labels, torch.Tensor):
        raise MudscError(f"{path}: 'labels' is a {type(labels).__name__}, not a tensor")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise MudscError(f"{path}: 'labels' has dtype {labels.dtype}; use integer class ids")
    if labels.dim() != 1 or len(labels) != count:
        raise MudscError(f"{path}: 'labels' has shape {tuple(labels.shape)} but 'inputs' holds "
                         f"{count} examples; give one class id per example")  # fmt: skip
    return labels.long()
