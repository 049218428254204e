"""IDX files (MNIST, Fashion-MNIST), parsed directly with numpy: no torchvision needed."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from mudsc.errors import MudscError

_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_file(directory: Path, stem: str) -> Path | None:
    """The gzipped or raw version of an IDX file in ``directory`` (gzip preferred)."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def missing_files(directory: Path) -> list[str]:
    """Names of the four IDX files that ``directory`` lacks (in either form)."""
    return [stem for stem in FILES.values() if find_file(directory, stem) is None]


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise MudscError(f"{path}: corrupt or truncated gzip data ({exc}); re-download it") from exc


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes with ``ndim`` dimensions, validating its header."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise MudscError(f"{path}: file too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise MudscError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000{_UBYTE:02x}"
            f"{ndim:02x}); not an IDX file"
        )
    if data[2] != _UBYTE:
        raise MudscError(f"{path}: IDX data type code 0x{data[2]:02x} is not unsigned byte (0x08)")
    if data[3] != ndim:
        raise MudscError(f"{path}: IDX file has {data[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MudscError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(data) - header
    if actual != expected:
        state = "truncated" if actual < expected else "has trailing bytes"
        raise MudscError(
            f"{path}: IDX file {state}: dimensions {dims} need {expected} bytes of data, "
            f"found {actual}; re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_split(directory: Path, split: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N x 1 x H x W uint8) and labels (int64) of the 'train' or 't10k' split."""
    image_path = find_file(directory, FILES[f"{split}_images"])
    label_path = find_file(directory, FILES[f"{split}_labels"])
    if image_path is None or label_path is None:
        raise MudscError(f"{directory}: missing IDX files for the {split} split")
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if len(labels) != len(images):
        raise MudscError(
            f"{label_path}: holds {len(labels)} labels but {image_path.name} holds "
            f"{len(images)} images; the files do not belong together"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise MudscError(
            f"{label_path}: label {int(labels.max())} is out of range for {num_classes} classes"
        )
    image_tensor = torch.from_numpy(images.copy()).unsqueeze(1)
    return image_tensor, torch.from_numpy(labels.astype(np.int64))
