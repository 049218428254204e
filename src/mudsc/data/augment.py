"""Batched, device-agnostic augmentation with an explicit generator for reproducibility.

Random numbers are drawn on the generator's device and moved to the data, so a CPU
generator gives the same augmentation for CPU and GPU batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mudsc.errors import ConfigError


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each side by ``padding`` then crop every image at its own random offset."""
    if padding < 0:
        raise ConfigError(f"crop padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    n, channels, height, width = x.shape
    padded_width = width + 2 * padding
    padded = F.pad(x, (padding, padding, padding, padding)).reshape(n, channels, -1)
    offsets = torch.randint(
        0, 2 * padding + 1, (n, 2), generator=generator, device=generator.device
    ).to(x.device)
    # Flat index of every output pixel in the padded image: one gather for the whole batch.
    rows = torch.arange(height, device=x.device).view(-1, 1) * padded_width
    window = (rows + torch.arange(width, device=x.device)).view(1, -1)
    start = offsets[:, :1] * padded_width + offsets[:, 1:]
    index = (start + window).unsqueeze(1).expand(n, channels, height * width)
    return padded.gather(2, index).view(n, channels, height, width)


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def augment(x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop (if ``padding``) then random horizontal flip (if ``hflip``)."""
    x = random_crop(x, padding, generator)
    return random_hflip(x, generator) if hflip else x
