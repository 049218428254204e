"""What every experiment's source models are made from: the (subsampled) data, the model."""

from __future__ import annotations

from torch import nn

from mudsc.data import ImageDataset, limit_per_class, load_dataset
from mudsc.experiments.config import ExperimentConfig
from mudsc.models import create

SUBSAMPLE_SEED = 0


def prepare_dataset(cfg: ExperimentConfig) -> ImageDataset:
    """Load the dataset and keep at most the configured images per class (seeded)."""
    data = load_dataset(cfg.dataset, cfg.data_dir)
    return limit_per_class(
        data, cfg.train_images_per_class, cfg.test_images_per_class, SUBSAMPLE_SEED
    )


def build_model(cfg: ExperimentConfig, data: ImageDataset) -> nn.Module:
    """A fresh model of the configured architecture (checks arch_args early)."""
    return create(
        cfg.arch,
        in_channels=data.in_channels,
        image_size=data.image_size,
        embed_dim=cfg.embed_dim,
        **cfg.arch_args,
    )
