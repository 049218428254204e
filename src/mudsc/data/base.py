"""The in-memory dataset value every loader returns, so training and merging never touch files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mudsc.data.tasks import validate_classes
from mudsc.errors import ConfigError, DataError

_SPLITS = ("train", "test")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images in [0, 1] units.

    Computed from a 256-bin histogram per channel: exact, and far cheaper than converting
    tens of millions of pixels to float.
    """
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        mean = float((counts * levels).sum() / counts.sum())
        var = float((counts * (levels - mean) ** 2).sum() / counts.sum())
        means.append(mean)
        stds.append(max(var**0.5, 1e-6))
    return tuple(means), tuple(stds)


@dataclass
class ImageDataset:
    """A labelled image set held as uint8 tensors (N x C x H x W) with its normalisation.

    Images stay uint8 (4x smaller than float) and are normalised per batch, on the device
    that consumes them. Labels are global class ids; task splits only select classes.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = False
    crop_padding: int = 2

    def __post_init__(self) -> None:
        for split in _SPLITS:
            images, labels = self._split(split)
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise DataError(
                    f"dataset {self.name!r}: {split} images must be a uint8 N x C x H x W "
                    f"tensor, got {images.dtype} with shape {tuple(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
                raise DataError(
                    f"dataset {self.name!r}: {split} labels must be int64 of length "
                    f"{images.shape[0]}, got {labels.dtype} with shape {tuple(labels.shape)}"
                )
            if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.class_names)):
                raise DataError(
                    f"dataset {self.name!r}: {split} labels must lie in "
                    f"[0, {len(self.class_names) - 1}]"
                )
        if len(self.train_images) == 0:
            raise DataError(
                f"dataset {self.name!r} has no training images; a dataset needs some to train "
                "on and to calibrate merges"
            )
        if self.test_images.shape[1:] != self.train_images.shape[1:]:
            raise DataError(
                f"dataset {self.name!r}: train images are {tuple(self.train_images.shape[1:])} "
                f"but test images are {tuple(self.test_images.shape[1:])}"
            )
        if not len(self.mean) == len(self.std) == self.in_channels:
            raise DataError(
                f"dataset {self.name!r}: mean/std need one value per channel ({self.in_channels})"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "train":
            return self.train_images, self.train_labels
        if split == "test":
            return self.test_images, self.test_labels
        raise ConfigError(f"unknown split {split!r}: use 'train' or 'test'")

    def subset(
        self, classes: Sequence[int], split: str = "train"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and (global) labels of the given classes, in dataset order."""
        wanted = validate_classes(classes, self.num_classes)
        images, labels = self._split(split)
        mask = torch.isin(labels, torch.tensor(wanted, dtype=labels.dtype))
        return images[mask], labels[mask]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 ``(x / 255 - mean) / std``, on the images' device."""
        if images.dtype != torch.uint8:
            raise DataError(f"normalize expects uint8 images, got {images.dtype}")
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(shape)
        return (images.float() / 255.0 - mean) / std
