"""IDX files (MNIST, Fashion-MNIST), parsed directly with numpy: no torchvision needed.

The header is read first and its dimensions checked against the bytes the file holds (for
a gzip file: no more than deflate can produce from it), and a gzip stream is read no
further than the header says, so a header that overflows or a gzip bomb costs nothing.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import IO

import numpy as np
import torch

from mudsc.data.files import MAX_DEFLATE_RATIO
from mudsc.errors import DataError
from mudsc.inputs import regular_file

_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_file(directory: Path, stem: str) -> Path | None:
    """The gzipped or raw version of an IDX file in ``directory`` (gzip preferred).

    A name that exists but is no regular file (a FIFO, a symlink loop) is an error, not a
    missing file: reading it would hang or fail obscurely.
    """
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.exists() or candidate.is_symlink():
            return regular_file(candidate, "IDX file")
    return None


def missing_files(directory: Path) -> list[str]:
    """Names of the four IDX files that ``directory`` lacks (in either form)."""
    return [stem for stem in FILES.values() if find_file(directory, stem) is None]


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes with ``ndim`` dimensions, validating its header."""
    path = regular_file(path, "IDX file")
    size = path.stat().st_size
    with path.open("rb") as probe:
        compressed = probe.read(2) == _GZIP_MAGIC
    try:
        with gzip.open(path, "rb") if compressed else path.open("rb") as handle:
            dims = _read_header(handle, path, ndim)
            expected = math.prod(dims)
            _check_room(path, dims, expected, size, compressed, 4 + 4 * ndim)
            data = handle.read(expected + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip data ({exc}); re-download it") from exc
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "has trailing bytes"
        found = f"found {len(data)}" if len(data) < expected else "found more"
        raise DataError(
            f"{path}: IDX file {state}: dimensions {dims} need {expected} bytes of data, "
            f"{found}; re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _read_header(handle: IO[bytes], path: Path, ndim: int) -> tuple[int, ...]:
    """The dimensions of an IDX header of unsigned bytes with ``ndim`` dimensions."""
    magic = handle.read(4)
    if len(magic) < 4:
        raise DataError(f"{path}: file too short for an IDX header ({len(magic)} bytes)")
    if magic[0] != 0 or magic[1] != 0:
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic.hex()} (expected 0x0000{_UBYTE:02x}"
            f"{ndim:02x}); not an IDX file"
        )
    if magic[2] != _UBYTE:
        raise DataError(f"{path}: IDX data type code 0x{magic[2]:02x} is not unsigned byte (0x08)")
    if magic[3] != ndim:
        raise DataError(f"{path}: IDX file has {magic[3]} dimensions, expected {ndim}")
    raw = handle.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({4 + len(raw)} bytes, need {4 + 4 * ndim})")
    return tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim))


def _check_room(
    path: Path, dims: tuple[int, ...], expected: int, size: int, compressed: bool, header: int
) -> None:
    """Refuse dimensions the file cannot hold, before reading (let alone allocating) them."""
    if compressed and expected > MAX_DEFLATE_RATIO * size:
        raise DataError(
            f"{path}: IDX header dimensions {dims} need {expected} bytes, more than a "
            f"{size}-byte gzip file can hold; the file is damaged, re-download it"
        )
    if not compressed and size - header != expected:
        state = "truncated" if size - header < expected else "has trailing bytes"
        raise DataError(
            f"{path}: IDX file {state}: dimensions {dims} need {expected} bytes of data, "
            f"found {size - header}; re-download it"
        )


def load_split(directory: Path, split: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N x 1 x H x W uint8) and labels (int64) of the 'train' or 't10k' split."""
    image_path = find_file(directory, FILES[f"{split}_images"])
    label_path = find_file(directory, FILES[f"{split}_labels"])
    if image_path is None or label_path is None:
        raise DataError(f"{directory}: missing IDX files for the {split} split")
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if len(labels) != len(images):
        raise DataError(
            f"{label_path}: holds {len(labels)} labels but {image_path.name} holds "
            f"{len(images)} images; the files do not belong together"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise DataError(
            f"{label_path}: label {int(labels.max())} is out of range for {num_classes} classes"
        )
    image_tensor = torch.from_numpy(images.copy()).unsqueeze(1)
    return image_tensor, torch.from_numpy(labels.astype(np.int64))
