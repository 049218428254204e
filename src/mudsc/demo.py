"""``mudsc demo``: the whole job on the embedded MNIST subset, in a few minutes on a CPU.

Two small ResNet-20s are trained from different seeds on disjoint halves of the classes,
then merged with every method; each row reports joint, per-task and average accuracy.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from mudsc.data import draw_calibration, load_dataset, split_classes
from mudsc.evaluate import embed, evaluate_embeddings
from mudsc.merge import MergeConfig, merge_models
from mudsc.methods import METHODS
from mudsc.models.head import ClassEmbeddingHead
from mudsc.progress import Progress, quiet
from mudsc.train import TrainConfig, train

DEMO_ARCH = "resnet20"
DEMO_ARCH_ARGS: dict[str, Any] = {"width": 1}
DEMO_TRAIN = TrainConfig(epochs=3, batch_size=64, lr=0.05, warmup_epochs=0.5, seed=0)
DEMO_CALIBRATION = 500
DEMO_ALPHA = 0.5


def run_demo(
    device: torch.device | str = "cpu", progress: Progress | None = None
) -> dict[str, Any]:
    """Train, evaluate and merge; returns {"title", "tasks", "rows"} (accuracies as fractions)."""
    step = progress or quiet
    data = load_dataset("embedded")
    tasks = split_classes(data.num_classes, [5, 5], seed=0)
    head = ClassEmbeddingHead.orthonormal(data.num_classes, 512, seed=0)
    test_x, test_y = data.normalize(data.test_images), data.test_labels

    models = []
    for i, classes in enumerate(tasks):
        cfg = replace(DEMO_TRAIN, seed=i + 1)
        result = train(
            DEMO_ARCH, data, classes, head, cfg, DEMO_ARCH_ARGS, device,
            progress=step, stage=f"train model {i} (classes {classes})",
        )  # fmt: skip
        models.append(result.model)

    rows: list[dict[str, Any]] = []
    embeddings = [embed(m, test_x, 500, device) for m in models]
    for i, emb in enumerate(embeddings):
        rows.append(
            {"method": f"model {i}", **_scores(evaluate_embeddings([emb], test_y, tasks, head))}
        )
    rows.append(
        {"method": "ensemble", **_scores(evaluate_embeddings(embeddings, test_y, tasks, head))}
    )

    union = sorted(c for t in tasks for c in t)
    batches = draw_calibration(data, union, DEMO_CALIBRATION, 100, seed=0, device=device).batches
    for k, method in enumerate(METHODS):
        step("merge", k, len(METHODS), method)
        start = time.perf_counter()
        cfg = MergeConfig(method=method, alpha=DEMO_ALPHA, device=str(device))
        merged = merge_models(models, batches, cfg).model
        seconds = time.perf_counter() - start
        report = evaluate_embeddings([embed(merged, test_x, 500, device)], test_y, tasks, head)
        rows.append({"method": method, **_scores(report), "seconds": round(seconds, 2)})
    step("merge", len(METHODS), len(METHODS), "done")
    return {
        "title": f"embedded MNIST subset, {DEMO_ARCH} x{DEMO_ARCH_ARGS['width']}, tasks {tasks}",
        "tasks": tasks,
        "rows": rows,
    }


def _scores(report: Any) -> dict[str, Any]:
    return {"joint": report.joint, "per_task": list(report.per_task), "avg": report.avg}
