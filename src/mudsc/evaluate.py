"""The paper's evaluation protocol (docs/ALGORITHM.md section 8): joint, per-task, average.

A single model (source or merged) is scored over the union of the tasks' classes; an
ensemble lets each model score its own task's classes with softmax(100 cos) and the most
confident model wins the joint prediction.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mudsc import distributed
from mudsc.data.batches import check_batch_size
from mudsc.errors import CheckpointError, ConfigError, DataError
from mudsc.models.head import ClassEmbeddingHead
from mudsc.modes import eval_mode
from mudsc.partial import PartialMerge

ENSEMBLE_SCALE = 100.0


@dataclass(frozen=True)
class Report:
    """Accuracies as fractions in [0, 1]."""

    joint: float
    per_task: tuple[float, ...]
    avg: float
    n_images: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_task"] = list(self.per_task)
        return d


class HeadView(nn.Module):
    """One head of a partial merge, seen as a model of its own (trunk + head i)."""

    def __init__(self, partial: PartialMerge, index: int) -> None:
        super().__init__()
        self.partial, self.index = partial, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.partial.forward_heads(x)[self.index]


def expected_input(model: nn.Module) -> tuple[int, int, int] | None:
    """(channels, height, width) a zoo model was built for, from its ``config``; None for
    models that do not record it (their first forward is the check)."""
    config = getattr(model, "config", None)
    if isinstance(config, Mapping) and "in_channels" in config and "image_size" in config:
        size = int(config["image_size"])
        return int(config["in_channels"]), size, size
    return None


def _shape(dims: Sequence[int]) -> str:
    return " x ".join(str(d) for d in dims)


def check_input_shape(model: nn.Module, images: torch.Tensor, what: str = "the images") -> None:
    """Refuse images of another channel count or size than the model was built for.

    A convolutional net with global pooling runs on any size and would report a
    meaningless accuracy instead of failing, so the recorded shape is compared up front.
    """
    expected = expected_input(model)
    got = tuple(images.shape[1:])
    if expected is not None and got != expected:
        raise DataError(
            f"{what} are {_shape(got)} (channels x height x width) but the model was built "
            f"for {_shape(expected)}; use data of the model's shape or a model built for it"
        )


def check_finite_weights(model: nn.Module, name: str = "the model") -> None:
    """Refuse a model with NaN or infinite weights: it would score chance, not fail."""
    for key, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(
                f"{name} has NaN or infinite values in {key!r}; the checkpoint is broken "
                "(re-train or re-export it)"
            )


def _forward(model: nn.Module, x: torch.Tensor, first: bool) -> torch.Tensor:
    """One batch's embeddings; the first batch's failure is reported as an input mismatch
    (models without a recorded input shape meet their data here first)."""
    try:
        out = model(x).float()
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, IndexError) as exc:
        if not first:
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"the model cannot run on inputs of shape {_shape(x.shape[1:])} ({reason}); "
            "use data of the shape the model was built for"
        ) from exc
    if not torch.isfinite(out).all():
        raise CheckpointError(
            "the model's outputs contain NaN or infinite values (its weights are finite: it "
            "overflows on these inputs); the checkpoint is unusable, re-train or re-export it"
        )
    return out


@torch.no_grad()
def embed(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device | str
) -> torch.Tensor:
    """Embeddings of ``images`` (already normalised floats), computed in batches, on CPU.

    Non-finite outputs are refused per batch (a NaN embedding scores as chance).  Inside a
    process group each rank embeds its share of the batches and all gather them.
    """
    starts = range(0, len(images), batch_size)
    with eval_mode(model), distributed.guard():
        mine = {
            i: _forward(model, images[i : i + batch_size].to(device), first=i == 0).cpu()
            for i in distributed.shard(starts)
        }
    out = distributed.gather_items(mine)
    return torch.cat([out[i] for i in starts]) if out else torch.empty(0)


def _check_tasks(tasks: Sequence[Sequence[int]], head: ClassEmbeddingHead) -> list[list[int]]:
    tasks = [sorted(int(c) for c in t) for t in tasks]
    if not tasks or any(not t for t in tasks):
        raise ConfigError("evaluation needs at least one non-empty task (a list of class ids)")
    flat = [c for t in tasks for c in t]
    if len(set(flat)) != len(flat):
        raise ConfigError(f"tasks overlap: {tasks}; each class may belong to one task only")
    bad = [c for c in flat if not 0 <= c < head.num_classes]
    if bad:
        raise ConfigError(f"class ids {bad} are out of range 0..{head.num_classes - 1}")
    return tasks


def evaluate_embeddings(
    embeddings: Sequence[torch.Tensor],
    labels: torch.Tensor,
    tasks: Sequence[Sequence[int]],
    head: ClassEmbeddingHead,
) -> Report:
    """Score precomputed embeddings: one tensor = one model, several = an ensemble."""
    tasks = _check_tasks(tasks, head)
    if len(embeddings) > 1 and len(embeddings) != len(tasks):
        raise ConfigError(
            f"an ensemble of {len(embeddings)} models needs one task per model, got {len(tasks)}"
        )
    if head.embeddings.device.type != "cpu":
        head = copy.deepcopy(head).to("cpu")
    union = sorted(c for t in tasks for c in t)
    keep = torch.isin(labels, torch.tensor(union))
    labels = labels[keep]
    embeddings = [e[keep] for e in embeddings]
    if len(labels) == 0:
        raise DataError(f"no test images of the classes {union}")

    if len(embeddings) == 1:
        logits = head(embeddings[0], union)
        joint_pred = torch.tensor(union)[logits.argmax(dim=1)]
    else:
        best = torch.full((len(labels),), -1.0)
        joint_pred = torch.zeros(len(labels), dtype=torch.long)
        for emb, task in zip(embeddings, tasks, strict=True):
            prob = head(emb, task, scale=ENSEMBLE_SCALE).softmax(dim=1)
            conf, idx = prob.max(dim=1)
            better = conf > best
            best = torch.where(better, conf, best)
            joint_pred = torch.where(better, torch.tensor(task)[idx], joint_pred)
    joint = (joint_pred == labels).float().mean().item()

    per_task = []
    for t, task in enumerate(tasks):
        mask = torch.isin(labels, torch.tensor(task))
        if not mask.any():
            raise DataError(f"no test images of task {t} (classes {task})")
        emb = embeddings[0] if len(embeddings) == 1 else embeddings[t]
        pred = torch.tensor(task)[head(emb[mask], task).argmax(dim=1)]
        per_task.append((pred == labels[mask]).float().mean().item())
    return Report(
        joint=joint,
        per_task=tuple(per_task),
        avg=sum(per_task) / len(per_task),
        n_images=len(labels),
    )


def evaluate(
    models: nn.Module | Sequence[nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    tasks: Sequence[Sequence[int]],
    head: ClassEmbeddingHead,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
) -> Report:
    """Joint / per-task / average accuracy of one model or an ensemble on normalised images.

    For an ensemble, model ``m`` is the expert of ``tasks[m]``.
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    _check_arguments(models, images, labels, batch_size)
    for i, model in enumerate(models):
        check_finite_weights(model, f"model {i}" if len(models) > 1 else "the model")
        check_input_shape(model, images)
    if len(models) == 1 and isinstance(models[0], PartialMerge):
        # a partial merge is scored like an ensemble: head i is the expert of task i
        models = [HeadView(models[0], i) for i in range(models[0].n_models)]
    embeddings = [embed(m, images, batch_size, device) for m in models]
    return evaluate_embeddings(embeddings, labels, tasks, head)


def _check_arguments(
    models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> None:
    """Cheap checks of what evaluate is given, before any forward pass."""
    if not models:
        raise ConfigError("evaluate needs at least one model")
    check_batch_size(batch_size)
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels; give one label per image")
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise DataError("the images contain NaN or infinite values; check the data file")
