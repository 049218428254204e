"""CIFAR-10/100 in the official "python version" layout (pickled batches)."""

from __future__ import annotations

import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mudsc.errors import DataError
from mudsc.inputs import regular_file

_NUMPY_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") else "numpy.core"
_NUMPY_MODULES = {
    "numpy.core.multiarray",
    "numpy._core.multiarray",
    "numpy.core.numeric",
    "numpy._core.numeric",
}
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
}
_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its batches and which pickle keys it uses."""

    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int


CIFAR10 = CifarLayout(
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
    num_classes=10,
)
CIFAR100 = CifarLayout(
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
    num_classes=100,
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only.

    Equivalent to ``pickle.load(f, encoding="bytes")`` on genuine CIFAR files, but a
    tampered file cannot run arbitrary code through the loader.
    """

    def find_class(self, module: str, name: str) -> object:
        key = (module, name)
        if module in _NUMPY_MODULES:
            key = (module.rsplit(".", 1)[1], name)
            module = module.replace("numpy.core.", f"{_NUMPY_CORE}.").replace(
                "numpy._core.", f"{_NUMPY_CORE}."
            )
        if key not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def missing_files(directory: Path, layout: CifarLayout) -> list[str]:
    """Names of the batch files that ``directory`` lacks (one that exists but is no regular
    file, a FIFO or a symlink loop, is an error: reading it would hang or fail obscurely)."""
    names = (*layout.train_files, layout.test_file, layout.meta_file)
    return [name for name in names if not _present(directory / name)]


def _present(path: Path) -> bool:
    if path.exists() or path.is_symlink():
        regular_file(path, "CIFAR batch")
        return True
    return False


def _unpickle(path: Path) -> dict:
    path = regular_file(path, "CIFAR batch")
    try:
        with path.open("rb") as handle:
            content = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, MemoryError, RecursionError) as exc:  # fmt: skip
        raise DataError(f"{path}: cannot unpickle CIFAR batch ({exc}); re-download it") from exc
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(content).__name__}")
    return content


def _read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    content = _unpickle(path)
    for key in (b"data", layout.label_key):
        if key not in content:
            raise DataError(f"{path}: batch has no {key!r} entry; is this the right CIFAR?")
    data = np.asarray(content[b"data"])
    labels = np.asarray(content[layout.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(
            f"{path}: b'data' must be uint8 rows of {_PIXELS} pixels, got {data.dtype} "
            f"with shape {data.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(
            f"{path}: {len(data)} images but {labels.size} labels; the batch is corrupt"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DataError(
            f"{path}: labels must lie in [0, {layout.num_classes - 1}], found "
            f"[{labels.min()}, {labels.max()}]"
        )
    return data, labels.astype(np.int64)


def _read_split(
    directory: Path, names: tuple[str, ...], layout: CifarLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [_read_batch(directory / name, layout) for name in names]
    data = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[1] for b in batches])
    return torch.from_numpy(data), torch.from_numpy(labels)


def _class_names(directory: Path, layout: CifarLayout) -> list[str]:
    path = directory / layout.meta_file
    names = _unpickle(path).get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise DataError(
            f"{path}: expected {layout.num_classes} class names under {layout.names_key!r}"
        )
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(
    directory: Path, layout: CifarLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Train images/labels, test images/labels and class names from a batches folder."""
    train_images, train_labels = _read_split(directory, layout.train_files, layout)
    test_images, test_labels = _read_split(directory, (layout.test_file,), layout)
    return train_images, train_labels, test_images, test_labels, _class_names(directory, layout)
