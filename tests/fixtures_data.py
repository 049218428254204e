"""Writers of small, learnable dataset fixtures in the real on-disk formats.

Each image is faint noise plus a bright square whose position encodes the class, so a
tiny model can learn it in a few steps; other test files may use these too.
"""

from __future__ import annotations

import gzip
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_FOLDERS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}


@dataclass
class Written:
    """What a writer put on disk: arrays as the loader should return them (N x C x H x W)."""

    path: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


def make_images(
    labels: np.ndarray, num_classes: int, channels: int, size: int, seed: int
) -> np.ndarray:
    """uint8 N x C x size x size images: noise in 0..63 plus a class-placed 255 square."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 64, size=(len(labels), channels, size, size), dtype=np.uint8)
    cells = math.ceil(math.sqrt(num_classes))
    cell = size // cells
    for i, label in enumerate(labels):
        row, col = divmod(int(label), cells)
        images[i, :, row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = 255
    return images


def make_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    """Every class as evenly as possible, in shuffled order."""
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes).astype(np.int64)


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a uint8 array in IDX format (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_file(path: Path, array: np.ndarray, gz: bool) -> Path:
    """Write one IDX file, gzipped (with a ``.gz`` suffix) or raw; returns its path."""
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def write_idx_dataset(
    dir: str | Path,
    n_train: int,
    n_test: int,
    gz: bool = True,
    num_classes: int = 10,
    size: int = 28,
) -> Written:
    """The four MNIST-style IDX files directly in ``dir``."""
    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        labels = make_labels(n, num_classes, seed)
        images = make_images(labels, num_classes, 1, size, seed + 10)
        write_idx_file(root / IDX_STEMS[f"{split}_images"], images[:, 0], gz)
        write_idx_file(root / IDX_STEMS[f"{split}_labels"], labels.astype(np.uint8), gz)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return Written(path=root, class_names=[str(c) for c in range(num_classes)], **arrays)


def _dump(path: Path, content: dict) -> None:
    with path.open("wb") as handle:
        pickle.dump(content, handle, protocol=2)


def write_cifar_dataset(
    dir: str | Path, num_classes: int = 10, n: int = 50, n_test: int | None = None
) -> Written:
    """A CIFAR-10 or -100 "python version" folder (``cifar-10-batches-py`` or
    ``cifar-100-python``) inside ``dir``, with ``n`` training and ``n_test`` test images."""
    if num_classes not in CIFAR_FOLDERS:
        raise ValueError("num_classes must be 10 or 100")
    folder = Path(dir) / CIFAR_FOLDERS[num_classes]
    folder.mkdir(parents=True, exist_ok=True)
    n_test = n // 5 if n_test is None else n_test
    names = [f"class_{c}" for c in range(num_classes)]
    arrays = {}
    for split, count, seed in (("train", n, 3), ("test", n_test, 4)):
        labels = make_labels(count, num_classes, seed)
        arrays[f"{split}_labels"] = labels
        arrays[f"{split}_images"] = make_images(labels, num_classes, 3, 32, seed + 10)
    flat = {s: arrays[f"{s}_images"].reshape(-1, 3 * 32 * 32) for s in ("train", "test")}
    if num_classes == 10:
        train_parts = np.array_split(np.arange(n), 5)
        for i, part in enumerate(train_parts, start=1):
            batch = {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"data": flat["train"][part],
                b"labels": arrays["train_labels"][part].tolist(),
            }
            _dump(folder / f"data_batch_{i}", batch)
        test = {b"data": flat["test"], b"labels": arrays["test_labels"].tolist()}
        _dump(folder / "test_batch", test)
        _dump(folder / "batches.meta", {b"label_names": [c.encode() for c in names]})
    else:
        for split in ("train", "test"):
            labels = arrays[f"{split}_labels"]
            batch = {
                b"data": flat[split],
                b"fine_labels": labels.tolist(),
                b"coarse_labels": (labels // 5).tolist(),
            }
            _dump(folder / split, batch)
        meta = {
            b"fine_label_names": [c.encode() for c in names],
            b"coarse_label_names": [f"super_{c}".encode() for c in range(20)],
        }
        _dump(folder / "meta", meta)
    return Written(path=folder, class_names=names, **arrays)
