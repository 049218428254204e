"""Mini-batches from in-memory tensors, for training and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from mudsc.errors import ConfigError, DataError


def check_batch_size(batch_size: object) -> None:
    """The one check of a batch size wherever one enters: an integer >= 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(transform(x), y)`` batches; the last batch may be smaller.

    Shuffling needs an explicit generator so that every run is reproducible; arguments
    are checked at the call, not at the first ``next``.
    """
    check_batch_size(batch_size)
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    if shuffle and generator is None:
        raise ConfigError("shuffling needs a seeded torch.Generator for reproducibility")
    order = None
    if shuffle:
        order = torch.randperm(len(images), generator=generator, device=generator.device)
    return _batches(images, labels, batch_size, order, transform)


def _batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    order: torch.Tensor | None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(images), batch_size):
        if order is None:
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            x, y = images[index.to(images.device)], labels[index.to(labels.device)]
        yield (transform(x) if transform is not None else x), y
