"""Calibration images for a merge: drawn in this one place so every caller draws alike.

The merge's statistics need unlabelled training images; choosing ``alpha: auto`` also
needs a small labelled slice that the statistics never saw.  One seeded permutation
gives both, so a seed names the whole draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mudsc.data.augment import augment as augment_batch
from mudsc.data.base import ImageDataset
from mudsc.errors import MudscError


@dataclass(frozen=True)
class CalibrationSet:
    """Normalised fit batches (on the device) and the labelled holdout (on the CPU) or None."""

    batches: list[torch.Tensor]
    held: tuple[torch.Tensor, torch.Tensor] | None


def draw_calibration(
    dataset: ImageDataset,
    classes: Sequence[int] | None,
    size: int,
    batch_size: int,
    seed: int,
    device: torch.device | str,
    *,
    augment: bool = False,
    holdout: float | None = None,
) -> CalibrationSet:
    """``size`` training images of ``classes`` (None: every class), drawn with ``seed``.

    With ``holdout`` the last ``max(1, int(size * holdout))`` drawn images are kept aside,
    labelled, to score candidate merges.  With ``augment`` the dataset's crop/flip policy
    is applied to the fit images after normalisation (crop padding takes the channel mean),
    drawing from the same generator right after the permutation.
    """
    if classes is None:
        images, labels = dataset.train_images, dataset.train_labels
    else:
        images, labels = dataset.subset(classes, split="train")
    if not 0 < size <= len(images):
        raise MudscError(
            f"asked for {size} calibration images but the chosen classes have {len(images)} "
            f"training images; choose 1..{len(images)}"
        )
    if batch_size <= 0:
        raise MudscError(f"batch size must be positive, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)[:size]
    cut = size if holdout is None else size - max(1, int(size * holdout))
    if cut < 1:
        raise MudscError(f"a holdout of {holdout} leaves no calibration images; lower it")
    fit = dataset.normalize(images[order[:cut]].to(device))
    if augment:
        fit = augment_batch(fit, dataset.crop_padding, dataset.hflip, generator)
    held = None
    if holdout is not None:
        held = (dataset.normalize(images[order[cut:]]), labels[order[cut:]])
    batches = [fit[i : i + batch_size] for i in range(0, len(fit), batch_size)]
    return CalibrationSet(batches, held)
