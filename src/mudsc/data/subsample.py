"""Smaller datasets for quick runs: at most N images per class, chosen with a seed."""

from __future__ import annotations

from dataclasses import replace

import torch

from mudsc.data.base import ImageDataset
from mudsc.errors import ConfigError


def _per_class(
    images: torch.Tensor, labels: torch.Tensor, limit: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if limit is None:
        return images, labels
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:limit]])
    order = torch.cat(keep).sort().values
    return images[order], labels[order]


def limit_per_class(
    dataset: ImageDataset, train: int | None, test: int | None, seed: int = 0
) -> ImageDataset:
    """Keep at most ``train`` / ``test`` images per class (None: all), in dataset order.

    The test split draws with ``seed + 1`` so the two splits are chosen independently.
    """
    for name, limit in (("train", train), ("test", test)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):  # fmt: skip
            raise ConfigError(f"images per class ({name}) must be an integer >= 1 or None, "
                              f"got {limit!r}")  # fmt: skip
    if train is None and test is None:
        return dataset
    train_x, train_y = _per_class(dataset.train_images, dataset.train_labels, train, seed)
    test_x, test_y = _per_class(dataset.test_images, dataset.test_labels, test, seed + 1)
    return replace(
        dataset, train_images=train_x, train_labels=train_y, test_images=test_x, test_labels=test_y
    )
