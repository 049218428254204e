"""Datasets, class splits, augmentation, batching: the only part of mudsc that reads data."""

from mudsc.data.augment import augment, random_crop, random_hflip
from mudsc.data.base import ImageDataset
from mudsc.data.batches import iterate_batches
from mudsc.data.calibration import CalibrationSet, draw_calibration
from mudsc.data.registry import (
    DATASETS,
    ENV_VAR,
    DatasetSource,
    DiskSource,
    MemorySource,
    dataset_names,
    load_dataset,
)
from mudsc.data.subsample import limit_per_class
from mudsc.data.tasks import parse_classes, parse_split, split_classes, validate_classes

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "CalibrationSet",
    "DatasetSource",
    "DiskSource",
    "ImageDataset",
    "MemorySource",
    "augment",
    "dataset_names",
    "draw_calibration",
    "iterate_batches",
    "limit_per_class",
    "load_dataset",
    "parse_classes",
    "parse_split",
    "random_crop",
    "random_hflip",
    "split_classes",
    "validate_classes",
]
