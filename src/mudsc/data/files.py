"""Input tensors from a file: calibration inputs for any model, labelled sets for scoring.

Models outside the zoo (token-id transformers, a user's own image model) have no dataset
of the registry to draw from, so the user hands over the inputs themselves, as the model
takes them (token ids, or images already normalised). One reader checks every format
the same way, so a mistake is one clear line before any model is touched.

Formats: ``.pt`` (``torch.load(weights_only=True)``: a tensor, or a dict with ``inputs``
and optional ``labels``), ``.safetensors`` (keys ``inputs``, optional ``labels``),
``.npz`` (the same keys) and ``.npy`` (one array: inputs only).

A file is checked before its arrays are allocated: a ``.npy`` header's shape must match
the bytes that follow it, and a zip member (``.npz``, ``.pt``) may not claim more bytes
than deflate can produce from its compressed size, so a 1 KB file cannot ask for 1 TB.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError

from mudsc.errors import ConfigError, DataError, ResourceError
from mudsc.inputs import regular_file

FORMATS = (".pt", ".safetensors", ".npz", ".npy")
# deflate cannot expand data more than ~1032:1; a member claiming more is lying (a bomb)
MAX_DEFLATE_RATIO = 1032


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
            raise DataError(f"asked for {size} examples but {self.path} holds {len(self)}; "
                            f"choose 1..{len(self)}")  # fmt: skip
        labels = None if self.labels is None else self.labels[:size]
        return TensorFile(self.inputs[:size], labels, self.path)


def read_tensor_file(path: str | Path, *, labelled: bool = False) -> TensorFile:
    """Read and check ``path``; with ``labelled`` the file must carry labels too."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise DataError(f"{path}: unknown input-file format {path.suffix!r}; "
                        f"use one of {', '.join(FORMATS)}")  # fmt: skip
    value = load_tensors(regular_file(path, "input file"))
    entries = {"inputs": value} if isinstance(value, torch.Tensor) else value
    if "inputs" not in entries:
        raise DataError(f"{path} has no 'inputs' tensor (found: {', '.join(entries) or 'none'})")
    inputs = _check_inputs(path, entries["inputs"])
    labels = entries.get("labels")
    if labels is not None:
        labels = _check_labels(path, labels, len(inputs))
    elif labelled:
        how = "a .npy file holds inputs only" if path.suffix == ".npy" else "it has none"
        raise DataError(f"{path} needs a 'labels' tensor to score a model ({how}); save "
                        "{'inputs': x, 'labels': y} as .pt, .safetensors or .npz")  # fmt: skip
    return TensorFile(inputs, labels, path)


def split_batches(inputs: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``inputs`` cut into consecutive batches of ``batch_size`` (the last may be smaller)."""
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    return [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]


def load_tensors(path: Path) -> torch.Tensor | dict[str, Any]:
    """The tensor, or the named values, that a .pt / .safetensors / .npz / .npy file holds.

    Headers and zip members are checked before anything is allocated; every failure is
    one :class:`DataError` line (a legitimate file too large for memory: ResourceError).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        if path.suffix == ".npy":
            with path.open("rb") as handle:
                _check_npy(handle, path.stat().st_size, path)
            return _from_numpy(np.load(path, allow_pickle=False))
        if path.suffix == ".npz":
            _check_npz(path)
            with np.load(path, allow_pickle=False) as archive:
                return {k: _from_numpy(archive[k]) for k in archive.files}
        _check_zip(path)
        value = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise ResourceError(f"{path} does not fit in this machine's memory") from None
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, TypeError, SafetensorError,
            zipfile.BadZipFile, pickle.UnpicklingError) as exc:  # fmt: skip
        raise DataError(f"cannot read {path}: {_first_line(exc)} "
                        "(is it truncated, or another format?)") from exc  # fmt: skip
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    raise DataError(f"{path} holds a {type(value).__name__}; save a tensor or a dict of "
                    "tensors")  # fmt: skip


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else repr(exc)


def _check_npy(handle: IO[bytes], size: int, path: Path, member: str = "") -> None:
    """The .npy header at ``handle`` declares a numeric array of exactly the ``size`` bytes
    the file (or zip member) holds; checked before numpy allocates it."""
    where = f"{path}{f' (array {member!r})' if member else ''}"
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    if dtype.kind not in "biuf":
        raise DataError(f"{where}: an array of dtype {dtype} is not numeric; save numbers")
    need = math.prod(shape) * dtype.itemsize
    held = size - handle.tell()
    if need != held:
        raise DataError(
            f"{where}: its header declares shape {_shape(shape)} ({need} bytes) but "
            f"{held} bytes follow; the file is truncated or damaged"
        )


def _check_zip(path: Path) -> list[zipfile.ZipInfo]:
    """The members of a zip-based file (.npz, .pt), refused if one claims more bytes than
    its compressed size can hold (a zip bomb); a legacy non-zip .pt gives []."""
    if not zipfile.is_zipfile(path):
        return []
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
    for info in members:
        if info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 1024:
            raise DataError(
                f"{path}: member {info.filename[:60]!r} claims {info.file_size} bytes from "
                f"{info.compress_size} compressed bytes, more than deflate can produce; "
                "the file is damaged or hostile"
            )
    return members


def _check_npz(path: Path) -> None:
    """Every array of an .npz archive passes :func:`_check_npy` against its member size."""
    members = _check_zip(path)
    with zipfile.ZipFile(path) as archive:
        for info in members:
            with archive.open(info) as handle:
                _check_npy(handle, info.file_size, path, info.filename.removesuffix(".npy"))


def _shape(shape: tuple[int, ...]) -> str:
    text = str(tuple(shape))
    return text if len(text) <= 80 else text[:77] + "..."


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind not in "biuf":
        raise ValueError(f"array of dtype {array.dtype} is not numeric")
    return torch.from_numpy(np.ascontiguousarray(array))


def _check_inputs(path: Path, inputs: Any) -> torch.Tensor:
    """Token ids become int64, images float32; anything else is refused.

    One example per row, each at least a vector (token ids: (N, T); images: (N, C, H, W)),
    and finite values: a NaN input would make every score NaN without a word.
    """
    if not isinstance(inputs, torch.Tensor):
        raise DataError(f"{path}: 'inputs' is a {type(inputs).__name__}, not a tensor")
    shape = _shape(tuple(inputs.shape))
    if inputs.dim() == 0 or len(inputs) == 0:
        raise DataError(f"{path} holds no examples ('inputs' has shape {shape})")
    if inputs.dim() == 1 or 0 in inputs.shape:
        raise DataError(f"{path}: 'inputs' has shape {shape}; give one non-empty example per "
                        "row, e.g. (N, T) token ids or (N, C, H, W) images")  # fmt: skip
    if inputs.is_floating_point():
        if not torch.isfinite(inputs).all():
            raise DataError(f"{path}: 'inputs' holds NaN or infinite values; fix the file")
        return inputs.float()
    if inputs.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        return inputs.long()
    raise DataError(f"{path}: 'inputs' has dtype {inputs.dtype}; use integer token ids or "
                    "floating-point images")  # fmt: skip


def _check_labels(path: Path, labels: Any, count: int) -> torch.Tensor:
    """One integer class per example."""
    if not isinstance(labels, torch.Tensor):
        raise DataError(f"{path}: 'labels' is a {type(labels).__name__}, not a tensor")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"{path}: 'labels' has dtype {labels.dtype}; use integer class ids")
    if labels.dim() != 1 or len(labels) != count:
        raise DataError(f"{path}: 'labels' has shape {_shape(tuple(labels.shape))} but 'inputs' "
                        f"holds {count} examples; give one class id per example")  # fmt: skip
    if len(labels) and int(labels.min()) < 0:
        raise DataError(f"{path}: 'labels' holds a negative class id; use ids 0, 1, 2...")
    return labels.long()
