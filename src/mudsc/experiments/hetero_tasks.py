"""The task kinds of the heterogeneous experiment: inputs, targets, decoders, losses.

Classification, image autoencoding, denoising and rotation prediction all start from the
same normalised clean images; each task has its own decoder on top of the encoder's
embedding and its own loss.  Scaled performance compares a merged encoder's loss with
the original's and with the loss of the best constant predictor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mudsc.data import ImageDataset
from mudsc.errors import ConfigError
from mudsc.modes import eval_mode

ROTATIONS = 4


class ImageDecoder(nn.Module):
    """Embedding -> image: a Linear to a (32, s/4, s/4) map, then two 2x up-convolutions."""

    def __init__(self, embed_dim: int, channels: int, size: int) -> None:
        super().__init__()
        if size % 4:
            raise ConfigError(f"image decoders need an image size divisible by 4, got {size}")
        self.base = size // 4
        self.fc = nn.Linear(embed_dim, 32 * self.base * self.base)
        self.up1 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(16, channels, 4, stride=2, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = F.relu(self.fc(z)).view(-1, 32, self.base, self.base)
        return self.up2(F.relu(self.up1(x)))


def make_decoder(task: str, embed_dim: int, data: ImageDataset) -> nn.Module:
    """The task's own decoder: a linear classifier or an image decoder."""
    if task == "classification":
        return nn.Linear(embed_dim, data.num_classes)
    if task == "rotation":
        return nn.Linear(embed_dim, ROTATIONS)
    return ImageDecoder(embed_dim, data.in_channels, data.image_size)


def _rotate(x: Tensor, turns: Tensor) -> Tensor:
    out = x.clone()
    for k in range(1, ROTATIONS):
        mask = (turns == k).to(x.device)
        if mask.any():
            out[mask] = torch.rot90(x[mask], k, dims=(2, 3))
    return out


def task_batch(
    task: str, x: Tensor, labels: Tensor, gen: torch.Generator, noise_std: float
) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of one task from normalised clean images; noise from ``gen``."""
    if task == "classification":
        return x, labels.to(x.device)
    if task == "autoencode":
        return x, x
    if task == "denoise":
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        return x + noise_std * noise, x
    turns = torch.randint(0, ROTATIONS, (len(x),), generator=gen)
    return _rotate(x, turns), turns.to(x.device)


def task_loss(task: str, output: Tensor, target: Tensor) -> Tensor:
    if task in ("classification", "rotation"):
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def constant_loss(task: str, data: ImageDataset, targets: Tensor) -> float:
    """Loss of the best constant predictor fitted on training data (class prior, mean image)."""
    if task == "classification":
        prior = torch.bincount(data.train_labels, minlength=data.num_classes).double()
        log_prior = (prior.clamp_min(1) / prior.sum()).log()
        return float(-log_prior[targets].mean())
    if task == "rotation":
        return math.log(ROTATIONS)
    mean_image = data.normalize(data.train_images).mean(dim=0, keepdim=True)
    return float(((targets - mean_image) ** 2).mean())


@torch.no_grad()
def mean_loss(
    task: str, encoder: nn.Module, decoder: nn.Module, inputs: Tensor, targets: Tensor,
    batch_size: int, device: Any,
) -> float:  # fmt: skip
    """Average loss over a fixed evaluation set, in batches."""
    total = 0.0
    with eval_mode(encoder, decoder):
        for i in range(0, len(inputs), batch_size):
            x = inputs[i : i + batch_size].to(device)
            out = decoder(encoder(x))
            total += float(task_loss(task, out, targets[i : i + batch_size].to(device))) * len(x)
    return total / len(inputs)


def fixed_set(
    task: str, images: Tensor, labels: Tensor, seed: int, noise_std: float
) -> tuple[Tensor, Tensor]:
    """A task's evaluation inputs/targets, drawn once from a fixed seed."""
    return task_batch(task, images, labels, torch.Generator().manual_seed(seed), noise_std)


def scaled_performance(l_avg: float, l_model: float, l_orig: float, task: str) -> float:
    """(L_avg - L_model) / (L_avg - L_orig): 1 = as good as the original, 0 = a constant."""
    if not l_avg - l_orig > 1e-12:
        raise ConfigError(
            f"the {task} encoder is no better than a constant predictor (loss {l_orig:.4g} vs "
            f"{l_avg:.4g}), so scaled performance is undefined; train it longer (train.epochs)"
        )
    return (l_avg - l_model) / (l_avg - l_orig)
