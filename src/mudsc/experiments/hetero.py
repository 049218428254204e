"""Merging encoders trained for different kinds of task (the paper's Taskonomy experiment).

Encoders of one architecture (a zoo model whose ``head`` Linear emits a small embedding)
are each trained jointly with their own decoder for one task: classification, image
autoencoding, denoising or rotation prediction.  Pairs of encoders are merged with every
method on plain calibration images; every task keeps its decoder and, with
``keep_heads``, its own encoder ``head`` fed by the merged trunk (the partial merge of the
paper: the head receives the model's unmerge matrix on its input axis).  Each task is
scored by the scaled performance (L_avg - L_merged) / (L_avg - L_original), where L_avg
is the loss of the best constant predictor: 1 = as good as the original, 0 = no better
than a constant.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mudsc.data import ImageDataset, draw_calibration
from mudsc.errors import ConfigError, DataError
from mudsc.experiments.config import ExperimentConfig
from mudsc.experiments.hetero_report import hetero_report
from mudsc.experiments.hetero_tasks import constant_loss, fixed_set, mean_loss, scaled_performance
from mudsc.experiments.hetero_train import task_job
from mudsc.experiments.pool import Ensure, MergeGroup
from mudsc.experiments.records import state_hash
from mudsc.experiments.reports import ReportFiles, mean_std
from mudsc.experiments.sources import build_model
from mudsc.merge import MergeResult
from mudsc.progress import Progress

TEST_SEED = 1234
HELD_SEED = 4321
MERGE_ROW_KEYS = ("loss", "scaled", "mean", "alpha", "alpha_scores", "seconds")

EvalSets = dict[str, tuple[Tensor, Tensor]]


def head_input_space(spec: Any, encoder: nn.Module) -> str:
    """The merge space feeding the encoder's ``head`` Linear (for per-task heads)."""
    n_in = encoder.head.weight.shape[1]
    for space in spec.mergeable:
        for m in space.consumers:
            if m.tensor == "head.weight" and m.axis == 1 and m.start == 0 and m.inner == 1:
                if space.size == n_in:
                    return space.name
    raise ConfigError(
        "keep_heads needs the encoder's 'head' Linear to read one whole merge space; this "
        "architecture's head does not, so set keep_heads: false (merge the whole encoder)"
    )


def task_encoder(merged: nn.Module, source: nn.Module, unmerge: Tensor | None) -> nn.Module:
    """The merged trunk with the source's own head; its input axis gets the unmerge matrix.

    Source features are approximately ``U_i @ merged features``, so the head's weight
    becomes ``W_i @ U_i``.  Without ``unmerge`` the merged model is used as is.
    """
    if unmerge is None:
        return merged
    model = copy.deepcopy(merged)
    weight = source.head.weight.detach()
    with torch.no_grad():
        model.head.weight.copy_(weight @ unmerge.to(weight.device, weight.dtype))
        model.head.bias.copy_(source.head.bias.detach())
    return model


def per_task_encoders(
    result: MergeResult, sources: Sequence[nn.Module], keep_heads: bool
) -> list[nn.Module]:
    """One encoder per source task: the merged model, with the task's own head if kept."""
    if not keep_heads:
        return [result.model for _ in sources]
    space = head_input_space(result.spec, sources[0])
    match = result.matches[space]
    return [task_encoder(result.model, s, match.unmerge_of(i)) for i, s in enumerate(sources)]


def contiguous(candidate: MergeResult) -> MergeResult:
    """A candidate of the alpha search in the memory layout of a finished merge.

    The engine keeps candidates channels-last and converts only the chosen one, so
    scoring a contiguous copy gives exactly the numbers of a merge at that alpha.
    """
    model = copy.deepcopy(candidate.model).to(memory_format=torch.contiguous_format)
    return replace(candidate, model=model)


class Scorer:
    """Scaled performance of the tasks of one pair on a fixed input set."""

    def __init__(
        self, tasks: Sequence[str], encoders: Sequence[nn.Module], decoders: Sequence[nn.Module],
        sets: EvalSets, l_avg: dict[str, float], batch_size: int, device: Any,
    ) -> None:  # fmt: skip
        self.tasks, self.encoders, self.decoders, self.sets = tasks, encoders, decoders, sets
        self.l_avg, self.batch_size, self.device = l_avg, batch_size, device
        self.l_orig = [self.loss(i, enc) for i, enc in enumerate(encoders)]

    def loss(self, i: int, encoder: nn.Module) -> float:
        task = self.tasks[i]
        x, y = self.sets[task]
        return mean_loss(task, encoder, self.decoders[i], x, y, self.batch_size, self.device)

    def __call__(self, encoders: Sequence[nn.Module]) -> dict[str, Any]:
        losses = [self.loss(i, e) for i, e in enumerate(encoders)]
        scaled = [scaled_performance(self.l_avg[t], lm, lo, t)
                  for t, lm, lo in zip(self.tasks, losses, self.l_orig, strict=True)]  # fmt: skip
        return {"loss": losses, "scaled": scaled, "mean": sum(scaled) / len(scaled)}


def summarize_hetero(
    pairs: list[dict[str, Any]], tasks: Sequence[str], methods: Sequence[str]
) -> dict[str, Any]:
    """Per method: each task's scaled performance over the pairs holding it, and the mean."""
    summary = {}
    for method in methods:
        per_task = {}
        for task in tasks:
            values = [p["rows"][method]["scaled"][p["tasks"].index(task)]
                      for p in pairs if task in p["tasks"]]  # fmt: skip
            if values:
                per_task[task] = mean_std(values)
        means = [v["mean"] for v in per_task.values()]
        summary[method] = {
            "per_task": per_task,
            "mean": {"mean": sum(means) / len(means),
                     "std": mean_std([p["rows"][method]["mean"] for p in pairs])["std"]},
            "seconds": mean_std([p["rows"][method]["seconds"] for p in pairs]),
            "alpha": [p["rows"][method]["alpha"] for p in pairs],
        }  # fmt: skip
    return summary


class HeteroPool:
    """One encoder per task kind (shared by every pair holding it), merged pair by pair."""

    row_keys = MERGE_ROW_KEYS

    def __init__(
        self, cfg: ExperimentConfig, data: ImageDataset, device: Any, progress: Progress
    ) -> None:
        if cfg.hetero is None:
            raise ConfigError("a hetero experiment needs a config with kind: hetero")
        self.cfg, self.hetero, self.data = cfg, cfg.hetero, data
        self.device, self.progress = device, progress
        self.tasks: dict[str, dict[str, float]] = {}

    def check(self) -> str:
        """Data-dependent checks before any training."""
        cfg, data = self.cfg, self.data
        if data.image_size % 4 or data.train_images.shape[-2] != data.image_size:
            raise DataError(
                f"hetero tasks need square images with a size divisible by 4; {cfg.dataset} "
                f"has {tuple(data.train_images.shape[-2:])}"
            )
        build_model(cfg, data)
        cal = cfg.calibration
        if cal.size > len(data.train_images):
            raise ConfigError(
                f"config key 'calibration.size' ({cal.size}) exceeds the "
                f"{len(data.train_images)} training images; lower it"
            )
        return f"encoder pairs {list(self.hetero.task_pairs)}"

    def _eval_sets(self, held: tuple[Tensor, Tensor]) -> tuple[EvalSets, EvalSets]:
        """Fixed (inputs, targets) per task: on the test split and on the calibration holdout."""
        data, hetero = self.data, self.hetero
        test_x = data.normalize(data.test_images)
        test = {t: fixed_set(t, test_x, data.test_labels, TEST_SEED, hetero.noise_std)
                for t in hetero.tasks}  # fmt: skip
        held_sets = {t: fixed_set(t, held[0], held[1], HELD_SEED, hetero.noise_std)
                     for t in hetero.tasks}  # fmt: skip
        return test, held_sets

    def groups(self, out: Path, ensure: Ensure, force: bool) -> Iterator[MergeGroup]:
        cfg, data, hetero, device = self.cfg, self.data, self.hetero, self.device
        models, hashes = {}, {}
        for task, seed in zip(hetero.tasks, hetero.seeds, strict=True):
            job = task_job(out / "tasks" / task, cfg, data, task, seed, device, self.progress)
            (encoder, decoder), _ = ensure(job)
            models[task] = (encoder, decoder)
            hashes[task] = [state_hash(encoder), state_hash(decoder)]
        cal = cfg.calibration
        calibration = draw_calibration(
            data, None, cal.size, cal.batch_size, cal.seed, device, augment=cal.augment,
            holdout=cal.holdout,
        )  # fmt: skip
        assert calibration.held is not None
        test_sets, held_sets = self._eval_sets(calibration.held)
        l_avg = {t: constant_loss(t, data, test_sets[t][1]) for t in hetero.tasks}
        l_avg_held = {t: constant_loss(t, data, held_sets[t][1]) for t in hetero.tasks}
        for t in hetero.tasks:
            x, y = test_sets[t]
            original = mean_loss(t, *models[t], x, y, cfg.eval_batch_size, device)
            scaled_performance(l_avg[t], original, original, t)  # fails early if undefined
            self.tasks[t] = {"original_loss": original, "constant_loss": l_avg[t]}
        for pair in hetero.task_pairs:
            encoders = [models[t][0] for t in pair]
            decoders = [models[t][1] for t in pair]
            held, test = (
                Scorer(pair, encoders, decoders, sets, avg, cfg.eval_batch_size, device)
                for sets, avg in ((held_sets, l_avg_held), (test_sets, l_avg))
            )
            yield self._group(out, pair, encoders, [hashes[t] for t in pair], held, test,
                              calibration.batches)  # fmt: skip

    def _group(
        self, out: Path, pair: tuple[str, str], encoders: list[nn.Module], hashes: list[Any],
        held: Scorer, test: Scorer, batches: list[Tensor],
    ) -> MergeGroup:  # fmt: skip
        keep_heads = self.hetero.keep_heads

        def score(candidate: MergeResult) -> float:
            return held(per_task_encoders(contiguous(candidate), encoders, keep_heads))["mean"]

        def evaluate(result: MergeResult) -> dict[str, Any]:
            return test(per_task_encoders(result, encoders, keep_heads))

        a, b = pair
        return MergeGroup(
            label=f"{a} + {b}",
            folder=out / "merges" / f"{a}+{b}",
            models=encoders,
            hashes=hashes,
            key={"tasks": pair, "keep_heads": keep_heads, "noise_std": self.hetero.noise_std},
            inputs=lambda _settings: (batches, score),
            evaluate=evaluate,
            entry={"tasks": list(pair)},
        )

    def results(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "tasks": dict(self.tasks),
            "pairs": groups,
            "summary": summarize_hetero(groups, self.hetero.tasks, self.cfg.methods),
        }

    def report(self, results: dict[str, Any]) -> ReportFiles:
        return hetero_report(results)
