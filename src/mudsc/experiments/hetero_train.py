"""Training (or reusing) one encoder with its task decoder, for the heterogeneous experiment.

Training runs :func:`mudsc.train.fit`, the loop of :func:`mudsc.train.train` (SGD with
momentum, weight decay on matrices only, :func:`mudsc.train.lr_at` warm-up and decay), on
every training image, with the task's own inputs, targets and loss.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mudsc.atomic import atomic_directory
from mudsc.checkpoint import load_checkpoint, read_state, save_checkpoint, write_safetensors
from mudsc.data import ImageDataset, augment
from mudsc.errors import CheckpointError, CorruptCheckpointError
from mudsc.experiments.config import ExperimentConfig
from mudsc.experiments.hetero_tasks import make_decoder, task_batch, task_loss
from mudsc.experiments.pool import SourceJob
from mudsc.experiments.records import make_key
from mudsc.experiments.sources import build_model
from mudsc.inputs import regular_file
from mudsc.progress import Progress
from mudsc.train import fit, sgd, train_config_dict

DECODER_FILE = "decoder.safetensors"
RECORD_FILE = "task.json"

TaskModels = tuple[nn.Module, nn.Module]  # (encoder, decoder)


def train_task(
    cfg: ExperimentConfig, data: ImageDataset, task: str, seed: int, device: Any,
    progress: Progress, label: str,
) -> tuple[nn.Module, nn.Module, dict[str, Any]]:  # fmt: skip
    """Train an encoder with its task decoder, jointly, on all training images.

    One generator (``seed``) draws the order, the augmentation and the task's own noise or
    rotations, in that order per batch.
    """
    tc, hetero = cfg.train, cfg.hetero
    assert hetero is not None
    torch.manual_seed(seed)
    encoder = build_model(cfg, data).to(device)
    decoder = make_decoder(task, cfg.embed_dim, data).to(device)
    images, labels = data.train_images, data.train_labels
    gen = torch.Generator().manual_seed(seed)
    padding = data.crop_padding if tc.crop_padding is None else tc.crop_padding

    def batch_loss(idx: Tensor) -> tuple[Tensor, dict[str, float]]:
        x = data.normalize(images[idx].to(device))
        if tc.augment:
            x = augment(x, padding, data.hflip, gen)
        inputs, targets = task_batch(task, x, labels[idx], gen, hetero.noise_std)
        return task_loss(task, decoder(encoder(inputs)), targets), {}

    # Weight decay on every matrix, a ViT's tokens included (exempt=()): changing the rule
    # would change trained encoders that task_key says are still valid.
    optimizer = sgd([encoder, decoder], tc, exempt=())
    fitted = fit([encoder, decoder], optimizer, len(images), tc, batch_loss, gen, progress, label)
    return encoder, decoder, {"history": fitted.history, "seconds": fitted.seconds}


def task_key(cfg: ExperimentConfig, task: str, seed: int) -> dict[str, Any]:
    """What a trained task encoder depends on."""
    assert cfg.hetero is not None
    return make_key({
        "dataset": cfg.dataset, "train_images_per_class": cfg.train_images_per_class,
        "arch": cfg.arch, "arch_args": cfg.arch_args, "embed_dim": cfg.embed_dim,
        "task": task, "noise_std": cfg.hetero.noise_std,
        "train": train_config_dict(replace(cfg.train, seed=seed)),
    })  # fmt: skip


def task_job(
    path: Path, cfg: ExperimentConfig, data: ImageDataset, task: str, seed: int, device: Any,
    progress: Progress,
) -> SourceJob[TaskModels]:  # fmt: skip
    """The encoder + decoder of ``task``: a folder with encoder/, the decoder and task.json."""
    key = task_key(cfg, task, seed)
    label = f"train {task} encoder"

    def load(where: Path) -> tuple[Any, TaskModels] | None:
        record_file = where / RECORD_FILE
        regular_file(record_file, "task record", CorruptCheckpointError)
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError) as exc:
            raise CorruptCheckpointError(f"{record_file} is unreadable ({exc})") from None
        if not isinstance(record, dict) or record.get("complete") is not True:
            return None
        encoder = load_checkpoint(where / "encoder", device).model
        decoder = make_decoder(task, cfg.embed_dim, data)
        state = read_state(where / DECODER_FILE, record.get("sha256"))
        try:
            decoder.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"the decoder in {where} does not fit task {task!r}: "
                                  f"{str(exc).splitlines()[0]}") from None  # fmt: skip
        return record.get("key"), (encoder.eval(), decoder.to(device).eval())

    def make() -> TaskModels:
        encoder, decoder, info = train_task(cfg, data, task, seed, device, progress, label)
        state = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}

        def write(tmp: Path) -> None:
            save_checkpoint(tmp / "encoder", encoder, {"kind": "hetero-encoder", "task": task,
                                                       "dataset": cfg.dataset})  # fmt: skip
            digest = write_safetensors(state, tmp / DECODER_FILE)
            record = {"key": key, "task": task, **info, "sha256": digest, "complete": True}
            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2))

        atomic_directory(path, True, write)
        return encoder, decoder

    return SourceJob(path, key, label, load, make)
