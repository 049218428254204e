"""Training source models on one task's classes (the paper's recipe, ALGORITHM.md section 8).

Each model sees only its own task's images and scores only its own task's classes through
the shared frozen class embeddings, so merged models land in one common output space.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mudsc.data import ImageDataset, augment, validate_classes
from mudsc.errors import MudscError
from mudsc.models import create
from mudsc.models.head import ClassEmbeddingHead
from mudsc.progress import Progress

log = logging.getLogger(__name__)

TRAIN_SCALE = 100.0


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; the defaults are the paper's recipe for ResNet-20 on CIFAR."""

    epochs: int = field(default=200, metadata={"help": "Training epochs (the paper uses 200)."})
    batch_size: int = field(default=500, metadata={"help": "Images per SGD step."})
    lr: float = field(default=0.4, metadata={"help": "Peak learning rate."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(
        default=5e-4, metadata={"help": "L2 penalty on weights (not on biases or norms)."}
    )
    warmup_epochs: float = field(
        default=5.0, metadata={"help": "Epochs of linear warm-up before the linear decay."}
    )
    augment: bool = field(default=True, metadata={"help": "Random crop / flip while training."})
    crop_padding: int | None = field(
        default=None,
        metadata={"help": "Random-crop padding (default: the dataset's, 4 at 32x32, 2 at 28x28)."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed for initialisation, order and augmentation."}
    )

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs > 0,
            "batch_size": self.batch_size > 0,
            "lr": self.lr > 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "warmup_epochs": self.warmup_epochs >= 0,
            "crop_padding": self.crop_padding is None or self.crop_padding >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise MudscError(
                f"invalid training settings: {', '.join(f'{k}={getattr(self, k)}' for k in bad)}"
            )


@dataclass
class TrainResult:
    """The trained model and what happened: per-epoch loss and accuracy, throughput."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up from 0 to ``peak``, then linear decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    remaining = max(total_steps - warmup_steps, 1)
    return peak * max(0.0, 1.0 - (step - warmup_steps) / remaining)


def train(
    arch: str,
    dataset: ImageDataset,
    classes: Sequence[int],
    head: ClassEmbeddingHead,
    config: TrainConfig | None = None,
    arch_args: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    stage: str = "train",
) -> TrainResult:
    """Train a fresh ``arch`` on the images of ``classes`` only; deterministic for a seed.

    ``progress`` hears ``(stage, epoch, epochs, "loss L acc A%")`` at the start (epoch 0)
    and after every epoch; the full records are in :attr:`TrainResult.history`.
    """
    config = config or TrainConfig()
    classes = sorted(validate_classes(list(classes), dataset.num_classes))
    arch_args = {
        "in_channels": dataset.in_channels,
        "image_size": dataset.image_size,
        **(arch_args or {}),
    }
    arch_args.setdefault("embed_dim", head.dim)
    if arch_args["embed_dim"] != head.dim:
        raise MudscError(
            f"embed_dim {arch_args['embed_dim']} must equal the head's dimension {head.dim}"
        )

    torch.manual_seed(config.seed)
    model = create(arch, **arch_args).to(device)
    head = head.to(device)
    images, labels = dataset.subset(classes, split="train")
    if len(images) == 0:
        raise MudscError(f"the training split of {dataset.name} has no images of classes {classes}")
    lookup = torch.full((dataset.num_classes,), -1, dtype=torch.long)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    targets_all = lookup[labels]

    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = round(config.warmup_epochs * steps_per_epoch)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    optimizer = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        momentum=config.momentum,
    )
    padding = dataset.crop_padding if config.crop_padding is None else config.crop_padding
    gen = torch.Generator().manual_seed(config.seed)
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    loss_fn = nn.CrossEntropyLoss()
    result = TrainResult(model=model)
    start = time.perf_counter()
    step = 0
    if progress is not None:
        progress(stage, 0, config.epochs)
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=gen)
        seen, loss_sum, correct = 0, 0.0, 0
        for i in range(0, len(order), config.batch_size):
            idx = order[i : i + config.batch_size]
            x = dataset.normalize(images[idx].to(device))
            if config.augment:
                x = augment(x, padding, dataset.hflip, aug_gen)
            y = targets_all[idx].to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, config.lr)
            logits = head(model(x), classes, scale=TRAIN_SCALE)
            loss = loss_fn(logits, y)
            if not torch.isfinite(loss):
                raise MudscError(
                    f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
        record = {"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen}
        result.history.append(record)
        log.info("epoch %d: loss %.4f acc %.4f", epoch + 1, record["loss"], record["accuracy"])
        if progress is not None:
            progress(stage, epoch + 1, config.epochs, epoch_note(record))
    result.seconds = time.perf_counter() - start
    result.images_per_second = len(images) * config.epochs / max(result.seconds, 1e-9)
    model.eval()
    return result


def epoch_note(record: dict[str, float]) -> str:
    """One epoch's record as the short note a progress bar shows."""
    return f"loss {record['loss']:.3f} acc {100 * record['accuracy']:.1f}%"


def train_config_dict(config: TrainConfig) -> dict[str, Any]:
    """JSON-ready record of the hyper-parameters, for checkpoint provenance."""
    return asdict(config)
