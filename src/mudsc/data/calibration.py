"""Calibration images for a merge: drawn in this one place so every caller draws alike.

The merge's statistics need unlabelled training images; choosing ``alpha: auto`` also
needs a small labelled slice that the statistics never saw.  One seeded permutation
gives both, so a seed names the whole draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mudsc.data.augment import augment as augment_batch
from mudsc.data.base import ImageDataset
from mudsc.data.batches import check_batch_size
from mudsc.errors import ConfigError, DataError


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
    labelled, to score candidate merges; fewer than one per class is refused
    (:func:`check_labelled_holdout`).  With ``augment`` the dataset's crop/flip policy
    is applied to the fit images after normalisation (crop padding takes the channel mean),
    drawing from the same generator right after the permutation.
    """
    check_batch_size(batch_size)
    images, labels = _pool(dataset, classes)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= len(images):
        raise ConfigError(
            f"asked for {size!r} calibration images but the chosen classes have {len(images)} "
            f"training images; choose 1..{len(images)}"
        )
    n_classes = dataset.num_classes if classes is None else len(set(classes))
    held_count = 0 if holdout is None else max(1, int(size * holdout))
    if holdout is not None:
        check_labelled_holdout(held_count, n_classes, holdout)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)[:size]
    cut = size - held_count
    if cut < 1:
        raise ConfigError(f"a holdout of {holdout} leaves no calibration images; lower it")
    fit = dataset.normalize(images[order[:cut]].to(device))
    if augment:
        fit = augment_batch(fit, dataset.crop_padding, dataset.hflip, generator)
    held = None
    if holdout is not None:
        held = (dataset.normalize(images[order[cut:]]), labels[order[cut:]])
    batches = [fit[i : i + batch_size] for i in range(0, len(fit), batch_size)]
    return CalibrationSet(batches, held)


def _pool(
    dataset: ImageDataset, classes: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images (and labels) to draw from; none at all is refused."""
    if classes is None:
        return dataset.train_images, dataset.train_labels
    images, labels = dataset.subset(classes, split="train")
    if len(images) == 0:
        raise DataError(
            f"dataset {dataset.name!r} has no training images of the classes {list(classes)}; "
            "choose classes it has images of"
        )
    return images, labels


def check_labelled_holdout(held: int, n_classes: int, holdout: float) -> None:
    """Refuse, before any merge work, a labelled holdout too small to rate alpha candidates.

    The candidates are scored by per-task accuracy on the held-out images; fewer images
    than classes leave some class unscored for sure (and possibly a whole task, which
    fails only after every candidate is built), so at least one image per class is asked.
    """
    if held < n_classes:
        need = math.ceil(n_classes / holdout)
        raise DataError(
            f"alpha='auto' would score each alpha on {held} held-out labelled image(s), fewer "
            f"than the {n_classes} classes (at least one per class is needed); draw about "
            f"{need} or more calibration images, raise the holdout, or give a fixed alpha"
        )
