"""Training source models on one task's classes (the paper's recipe, docs/ALGORITHM.md section 8).

Each model sees only its own task's images and scores only its own task's classes through
the shared frozen class embeddings, so merged models land in one common output space.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mudsc.data import ImageDataset, augment, validate_classes
from mudsc.errors import ConfigError, DataError
from mudsc.evaluate import check_input_shape
from mudsc.models import create
from mudsc.models.head import ClassEmbeddingHead
from mudsc.modes import train_mode
from mudsc.progress import Progress, quiet

log = logging.getLogger(__name__)

TRAIN_SCALE = 100.0
VIT_TOKENS = ("cls_token", "pos_embed")


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
            "epochs": _is_int(self.epochs) and self.epochs > 0,
            "batch_size": _is_int(self.batch_size) and self.batch_size > 0,
            "lr": _is_finite(self.lr) and self.lr > 0,
            "momentum": _is_finite(self.momentum) and 0 <= self.momentum < 1,
            "weight_decay": _is_finite(self.weight_decay) and self.weight_decay >= 0,
            "warmup_epochs": _is_finite(self.warmup_epochs) and self.warmup_epochs >= 0,
            "augment": isinstance(self.augment, bool),
            "crop_padding": self.crop_padding is None or _is_count(self.crop_padding),
            "seed": _is_int(self.seed),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"invalid training settings: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}"
                " (epochs, batch_size: integers >= 1; lr > 0; momentum in [0, 1); weight_decay,"
                " warmup_epochs, crop_padding >= 0)"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return _is_int(value) and value >= 0  # type: ignore[operator]


def _is_finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainResult:
    """The trained model and what happened: per-epoch loss and accuracy, throughput."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0


@dataclass(frozen=True)
class Fitted:
    """What :func:`fit` records: one ``{"epoch", "loss", ...}`` dict per epoch, wall time."""

    history: list[dict[str, float]]
    seconds: float


BatchLoss = Callable[[Tensor], tuple[Tensor, dict[str, float]]]
"""``batch_loss(indices) -> (mean loss, per-batch sums to average per image)``."""


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
        raise ConfigError(
            f"embed_dim {arch_args['embed_dim']} must equal the head's dimension {head.dim}"
        )
    images, labels = dataset.subset(classes, split="train")
    if len(images) == 0:
        raise DataError(
            f"the training split of {dataset.name} has no images of classes {classes}; "
            "choose classes the dataset has training images of"
        )

    torch.manual_seed(config.seed)
    model = create(arch, **arch_args).to(device)
    check_input_shape(model, images, f"the {dataset.name} images")
    head = head.to(device)
    lookup = torch.full((dataset.num_classes,), -1, dtype=torch.long)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    targets_all = lookup[labels]
    padding = dataset.crop_padding if config.crop_padding is None else config.crop_padding
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    loss_fn = nn.CrossEntropyLoss()

    def batch_loss(idx: Tensor) -> tuple[Tensor, dict[str, float]]:
        x = dataset.normalize(images[idx].to(device))
        if config.augment:
            x = augment(x, padding, dataset.hflip, aug_gen)
        y = targets_all[idx].to(device)
        logits = head(model(x), classes, scale=TRAIN_SCALE)
        return loss_fn(logits, y), {"accuracy": (logits.argmax(1) == y).sum().item()}

    fitted = fit(
        [model], sgd([model], config), len(images), config, batch_loss,
        torch.Generator().manual_seed(config.seed), progress or quiet, stage,
    )  # fmt: skip
    ips = len(images) * config.epochs / max(fitted.seconds, 1e-9)
    return TrainResult(model, fitted.history, fitted.seconds, ips)


def sgd(
    models: Sequence[nn.Module], config: TrainConfig, exempt: tuple[str, ...] = VIT_TOKENS
) -> torch.optim.SGD:
    """SGD with momentum whose weight decay falls on weight matrices only: never on vectors
    (biases, norm scales), nor on parameters named ``*<one of exempt>`` (a ViT's class token
    and position embedding are learned inputs, not weights to shrink)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for model in models:
        for name, p in model.named_parameters():
            (no_decay if p.ndim <= 1 or name.endswith(exempt) else decay).append(p)
    return torch.optim.SGD(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        momentum=config.momentum,
    )


def fit(
    models: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer,
    n_images: int,
    config: TrainConfig,
    batch_loss: BatchLoss,
    generator: torch.Generator,
    progress: Progress,
    stage: str,
) -> Fitted:
    """The one training loop: ``config.epochs`` passes over ``n_images`` images in an order
    shuffled by ``generator``, one :func:`lr_at`-scheduled ``optimizer`` step per batch.

    ``batch_loss(indices)`` returns the batch's mean loss and per-batch sums (e.g. correct
    predictions) that the epoch record averages per image. A non-finite loss stops training
    with an error. ``progress`` hears ``(stage, epoch, epochs, note)`` at the start (epoch 0)
    and after every epoch; the models come back in eval mode, ready for inference.
    """
    if n_images < 1:
        raise DataError(f"{stage}: there are no training images to fit on")
    steps_per_epoch = math.ceil(n_images / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = round(config.warmup_epochs * steps_per_epoch)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    step = 0
    progress(stage, 0, config.epochs, "")
    with train_mode(*models):
        for epoch in range(1, config.epochs + 1):
            order = torch.randperm(n_images, generator=generator)
            loss_sum = 0.0
            sums: dict[str, float] = {}
            for i in range(0, n_images, config.batch_size):
                idx = order[i : i + config.batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, warmup, config.lr)
                loss, batch_sums = batch_loss(idx)
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"{stage}: training diverged at epoch {epoch} (loss {loss.item()}); "
                        "lower the learning rate (--lr, or train.lr in a config)"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                loss_sum += loss.item() * len(idx)
                for key, value in batch_sums.items():
                    sums[key] = sums.get(key, 0) + value
            record = {"epoch": epoch, "loss": loss_sum / n_images}
            record.update({key: value / n_images for key, value in sums.items()})
            history.append(record)
            log.info("%s epoch %d: %s", stage, epoch, epoch_note(record))
            progress(stage, epoch, config.epochs, epoch_note(record))
    for model in models:
        model.eval()
    return Fitted(history, time.perf_counter() - start)


def epoch_note(record: dict[str, float]) -> str:
    """One epoch's record as the short note a progress bar shows."""
    note = f"loss {record['loss']:.3f}"
    if "accuracy" in record:
        note += f" acc {100 * record['accuracy']:.1f}%"
    return note


def train_config_dict(config: TrainConfig) -> dict[str, Any]:
    """JSON-ready record of the hyper-parameters, for checkpoint provenance."""
    return asdict(config)
