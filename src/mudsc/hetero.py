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
import datetime
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mudsc.atomic import atomic_directory
from mudsc.checkpoint import load_checkpoint, save_checkpoint
from mudsc.data import ImageDataset, augment
from mudsc.errors import MudscError
from mudsc.experiment import (
    Progress,
    _jsonable,
    _md_table,
    _quiet,
    bar_chart,
    build_model,
    check_key,
    clean_partials,
    machine_info,
    mean_std,
    prepare_dataset,
    read_record,
    state_hash,
    write_config_copy,
    write_record,
)
from mudsc.experiment_config import ExperimentConfig
from mudsc.train import lr_at, train_config_dict

log = logging.getLogger(__name__)

ROTATIONS = 4
TEST_SEED = 1234
HELD_SEED = 4321
DECODER_FILE = "decoder.safetensors"
RECORD_FILE = "task.json"


# --- tasks -------------------------------------------------------------------------------------


class ImageDecoder(nn.Module):
    """Embedding -> image: a Linear to a (32, s/4, s/4) map, then two 2x up-convolutions."""

    def __init__(self, embed_dim: int, channels: int, size: int) -> None:
        super().__init__()
        if size % 4:
            raise MudscError(f"image decoders need an image size divisible by 4, got {size}")
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
    encoder.eval()
    decoder.eval()
    total = 0.0
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


# --- training ------------------------------------------------------------------------------------


def train_task(
    cfg: ExperimentConfig, data: ImageDataset, task: str, seed: int, device: Any,
    progress: Progress, label: str,
) -> tuple[nn.Module, nn.Module, dict[str, Any]]:  # fmt: skip
    """Train an encoder with its task decoder, jointly, on all training images."""
    tc = cfg.train
    hetero = cfg.hetero
    assert hetero is not None
    torch.manual_seed(seed)
    encoder = build_model(cfg, data).to(device)
    decoder = make_decoder(task, cfg.embed_dim, data).to(device)
    params = [*encoder.named_parameters(), *decoder.named_parameters()]
    decay = [p for _, p in params if p.ndim > 1]
    no_decay = [p for _, p in params if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": tc.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, momentum=tc.momentum,
    )  # fmt: skip
    images, labels = data.train_images, data.train_labels
    steps = math.ceil(len(images) / tc.batch_size)
    total, warmup = steps * tc.epochs, round(tc.warmup_epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    padding = data.crop_padding if tc.crop_padding is None else tc.crop_padding
    history, step, start = [], 0, time.perf_counter()
    encoder.train()
    decoder.train()
    progress(label, 0, tc.epochs, "")
    for epoch in range(tc.epochs):
        order = torch.randperm(len(images), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(order), tc.batch_size):
            idx = order[i : i + tc.batch_size]
            x = data.normalize(images[idx].to(device))
            if tc.augment:
                x = augment(x, padding, data.hflip, gen)
            inputs, targets = task_batch(task, x, labels[idx], gen, hetero.noise_std)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, tc.lr)
            loss = task_loss(task, decoder(encoder(inputs)), targets)
            if not torch.isfinite(loss):
                raise MudscError(
                    f"training the {task} encoder diverged at epoch {epoch + 1}; lower train.lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(idx)
        history.append({"epoch": epoch + 1, "loss": loss_sum / len(images)})
        progress(label, epoch + 1, tc.epochs, f"loss {history[-1]['loss']:.3f}")
    encoder.eval()
    decoder.eval()
    return encoder, decoder, {"history": history, "seconds": time.perf_counter() - start}


def _task_key(cfg: ExperimentConfig, task: str, seed: int) -> dict[str, Any]:
    assert cfg.hetero is not None
    return _jsonable({
        "config": {
            "dataset": cfg.dataset, "train_images_per_class": cfg.train_images_per_class,
            "arch": cfg.arch, "arch_args": cfg.arch_args, "embed_dim": cfg.embed_dim,
            "task": task, "noise_std": cfg.hetero.noise_std,
            "train": train_config_dict(replace(cfg.train, seed=seed)),
        },
        "inputs": {},
    })  # fmt: skip


def _load_task(path: Path, key: dict, cfg: ExperimentConfig, data: ImageDataset, task: str,
               device: Any, force: bool) -> tuple[nn.Module, nn.Module] | None:  # fmt: skip
    """The finished encoder + decoder at ``path``, or None when it must be (re)trained."""
    try:
        record = json.loads((path / RECORD_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s has no readable %s; retraining", path, RECORD_FILE)
        return None
    if not isinstance(record, dict) or record.get("complete") is not True:
        return None
    if not check_key(path, record.get("key"), key, force):
        return None
    try:
        encoder = load_checkpoint(path / "encoder", device).model
        decoder = make_decoder(task, cfg.embed_dim, data)
        decoder.load_state_dict(load_file(str(path / DECODER_FILE)))
    except (MudscError, OSError, RuntimeError, SafetensorError) as exc:
        log.warning("%s is not a complete task model (%s); retraining", path, exc)
        return None
    return encoder.eval(), decoder.to(device).eval()


def ensure_task(
    path: Path, cfg: ExperimentConfig, data: ImageDataset, task: str, seed: int, device: Any,
    force: bool, progress: Progress,
) -> tuple[nn.Module, nn.Module, bool]:  # fmt: skip
    """Reuse the finished encoder + decoder of ``task``, or train and save them atomically."""
    key = _task_key(cfg, task, seed)
    label = f"train {task} encoder"
    if path.exists() and not force:
        loaded = _load_task(path, key, cfg, data, task, device, force)
        if loaded is not None:
            progress(label, 1, 1, "reused")
            return loaded[0], loaded[1], True
    encoder, decoder, info = train_task(cfg, data, task, seed, device, progress, label)
    state = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}

    def write(tmp: Path) -> None:
        save_checkpoint(tmp / "encoder", encoder, {"kind": "hetero-encoder", "task": task,
                                                   "dataset": cfg.dataset})  # fmt: skip
        save_file(state, str(tmp / DECODER_FILE))
        record = {"key": key, "task": task, **info, "complete": True}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2))

    atomic_directory(path, True, write)
    return encoder, decoder, False


# --- merging -------------------------------------------------------------------------------------


def head_input_space(spec: Any, encoder: nn.Module) -> str:
    """The merge space feeding the encoder's ``head`` Linear (for per-task heads)."""
    n_in = encoder.head.weight.shape[1]
    for space in spec.mergeable:
        for m in space.consumers:
            if m.tensor == "head.weight" and m.axis == 1 and m.start == 0 and m.inner == 1:
                if space.size == n_in:
                    return space.name
    raise MudscError(
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


def _scaled(l_avg: float, l_model: float, l_orig: float, task: str) -> float:
    if not l_avg - l_orig > 1e-12:
        raise MudscError(
            f"the {task} encoder is no better than a constant predictor (loss {l_orig:.4g} vs "
            f"{l_avg:.4g}), so scaled performance is undefined; train it longer (train.epochs)"
        )
    return (l_avg - l_model) / (l_avg - l_orig)


class _Scorer:
    """Scaled performance of the two tasks of one pair on a fixed input set."""

    def __init__(self, tasks, encoders, decoders, sets, l_avg, batch_size, device) -> None:
        self.tasks, self.encoders, self.decoders, self.sets = tasks, encoders, decoders, sets
        self.l_avg, self.batch_size, self.device = l_avg, batch_size, device
        self.l_orig = [self.loss(i, enc) for i, enc in enumerate(encoders)]

    def loss(self, i: int, encoder: nn.Module) -> float:
        task = self.tasks[i]
        x, y = self.sets[task]
        return mean_loss(task, encoder, self.decoders[i], x, y, self.batch_size, self.device)

    def __call__(self, encoders: Sequence[nn.Module]) -> dict[str, Any]:
        losses = [self.loss(i, e) for i, e in enumerate(encoders)]
        scaled = [_scaled(self.l_avg[t], lm, lo, t)
                  for t, lm, lo in zip(self.tasks, losses, self.l_orig, strict=True)]  # fmt: skip
        return {"loss": losses, "scaled": scaled, "mean": sum(scaled) / len(scaled)}


def merge_pair(
    encoders: Sequence[nn.Module], batches: list[Tensor], method: str, cfg: ExperimentConfig,
    held: _Scorer, test: _Scorer, device: Any,
) -> dict[str, Any]:  # fmt: skip
    """Merge two encoders (alpha chosen on held-out training images), score on test."""
    from mudsc.merge import METHODS, MergeConfig, merge_models

    assert cfg.hetero is not None
    dual = METHODS[method].dual
    alphas: list[float] = (
        list(cfg.alpha_grid)
        if dual and cfg.alpha == "auto"
        else [
            cfg.alpha if dual else 0.5  # type: ignore[list-item]
        ]
    )
    start = time.perf_counter()
    best, scores = None, {}
    for alpha in alphas:
        config = MergeConfig(method=method, alpha=alpha, device=str(device), **cfg.merge)
        result = merge_models(encoders, batches, config)
        per_task = _per_task_encoders(result, encoders, cfg.hetero.keep_heads)
        score = held(per_task)["mean"] if len(alphas) > 1 else 0.0
        scores[str(alpha)] = score
        if best is None or score > best[0]:
            best = (score, alpha, per_task, result)
    assert best is not None
    seconds = time.perf_counter() - start
    _, alpha, per_task, result = best
    return {
        "method": method, "alpha": alpha if dual else None,
        "alpha_scores": scores if len(alphas) > 1 else {}, "seconds": seconds,
        "timings": result.timings, **test(per_task),
    }  # fmt: skip


def _per_task_encoders(result: Any, sources: Sequence[nn.Module], keep_heads: bool) -> list:
    if not keep_heads:
        return [result.model for _ in sources]
    space = head_input_space(result.spec, sources[0])
    match = result.matches[space]
    return [task_encoder(result.model, s, match.unmerge_of(i)) for i, s in enumerate(sources)]


# --- the run --------------------------------------------------------------------------------------


def check_hetero(cfg: ExperimentConfig, data: ImageDataset) -> None:
    """Data-dependent checks before any training."""
    if data.image_size % 4 or data.train_images.shape[-2] != data.image_size:
        raise MudscError(
            f"hetero tasks need square images with a size divisible by 4; {cfg.dataset} has "
            f"{tuple(data.train_images.shape[-2:])}"
        )
    build_model(cfg, data)
    cal = cfg.calibration
    if cal.size > len(data.train_images):
        raise MudscError(
            f"config key 'calibration.size' ({cal.size}) exceeds the {len(data.train_images)} "
            "training images; lower it"
        )


def run_hetero(
    cfg: ExperimentConfig, device: torch.device | str = "cpu", force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train (or reuse) one encoder per task, merge every listed pair with every method."""
    hetero = cfg.hetero
    if hetero is None:
        raise MudscError("run_hetero needs a config with kind: hetero")
    step = progress or _quiet
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    data = prepare_dataset(cfg)
    check_hetero(cfg, data)
    clean_partials(out)
    out.mkdir(parents=True, exist_ok=True)
    write_config_copy(out, cfg)

    models, hashes, done = {}, {}, {"trained": 0, "merged": 0}
    for task, seed in zip(hetero.tasks, hetero.seeds, strict=True):
        encoder, decoder, reused = ensure_task(
            out / "tasks" / task, cfg, data, task, seed, device, force, step
        )
        models[task] = (encoder, decoder)
        hashes[task] = [state_hash(encoder), state_hash(decoder)]
        done["trained"] += not reused

    test_x = data.normalize(data.test_images)
    cal = cfg.calibration
    order = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(
        cal.seed))[: cal.size]  # fmt: skip
    cut = cal.size - max(1, int(cal.size * cal.holdout))
    fit = data.normalize(data.train_images[order[:cut]].to(device))
    if cal.augment:
        fit = augment(fit, data.crop_padding, data.hflip, torch.Generator().manual_seed(cal.seed))
    batches = [fit[i : i + cal.batch_size] for i in range(0, len(fit), cal.batch_size)]
    held_x, held_y = data.normalize(data.train_images[order[cut:]]), data.train_labels[order[cut:]]
    test_sets = {t: fixed_set(t, test_x, data.test_labels, TEST_SEED, hetero.noise_std)
                 for t in hetero.tasks}  # fmt: skip
    held_sets = {t: fixed_set(t, held_x, held_y, HELD_SEED, hetero.noise_std)
                 for t in hetero.tasks}  # fmt: skip
    l_avg = {t: constant_loss(t, data, test_sets[t][1]) for t in hetero.tasks}
    l_avg_held = {t: constant_loss(t, data, held_sets[t][1]) for t in hetero.tasks}
    originals = {}
    for t in hetero.tasks:
        enc, dec = models[t]
        x, y = test_sets[t]
        originals[t] = mean_loss(t, enc, dec, x, y, cfg.eval_batch_size, device)
        _scaled(l_avg[t], originals[t], originals[t], t)  # fails early if undefined

    pairs = []
    for a, b in hetero.task_pairs:
        pair = (a, b)
        encoders = [models[t][0] for t in pair]
        decoders = [models[t][1] for t in pair]
        scorers = [
            _Scorer(pair, encoders, decoders, sets, avg, cfg.eval_batch_size, device)
            for sets, avg in ((held_sets, l_avg_held), (test_sets, l_avg))
        ]
        label = f"merge {a} + {b}"
        rows = {}
        for j, method in enumerate(cfg.methods):
            step(label, j, len(cfg.methods), method)
            path = out / "merges" / f"{a}+{b}" / f"{method}.json"
            key = _merge_key(cfg, method, pair, hashes)
            record = None if force else read_record(path, key, force)
            if record is None:
                record = write_record(
                    path,
                    key,
                    merge_pair(encoders, batches, method, cfg, scorers[0], scorers[1], device),
                )
                done["merged"] += 1
            rows[method] = {
                k: record[k] for k in ("loss", "scaled", "mean", "alpha", "alpha_scores", "seconds")
            }
        step(label, len(cfg.methods), len(cfg.methods), "done")
        pairs.append({"tasks": list(pair), "rows": rows})

    results = {
        "name": cfg.name, "kind": "hetero", "config": _jsonable(cfg.to_dict()),
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(device), "wall_seconds": time.perf_counter() - started,
        "work": done,
        "tasks": {t: {"original_loss": originals[t], "constant_loss": l_avg[t]}
                  for t in hetero.tasks},
        "pairs": pairs,
        "summary": summarize_hetero(pairs, hetero.tasks, cfg.methods),
    }  # fmt: skip
    write_hetero_results(out, results)
    return results


def _merge_key(cfg: ExperimentConfig, method: str, pair: tuple[str, str], hashes: dict) -> dict:
    from mudsc.merge import METHODS

    assert cfg.hetero is not None
    dual = METHODS[method].dual
    return _jsonable({
        "config": {
            "method": method, "tasks": pair,
            "alpha": cfg.alpha if dual else None,
            "alpha_grid": cfg.alpha_grid if dual and cfg.alpha == "auto" else None,
            "merge": cfg.merge, "calibration": asdict(cfg.calibration),
            "keep_heads": cfg.hetero.keep_heads, "noise_std": cfg.hetero.noise_std,
            "test_images_per_class": cfg.test_images_per_class,
        },
        "inputs": {"sources": [hashes[t] for t in pair]},
    })  # fmt: skip


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


def _x100(ms: dict[str, float]) -> str:
    return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}"


def hetero_markdown(results: dict[str, Any]) -> str:
    """results.md: scaled performance x100 per task and mean, every method; then per pair."""
    cfg, summary = results["config"], results["summary"]
    tasks = list(results["tasks"])
    header = ["method", *tasks, "mean", "merge s"]
    lines = [[m, *[_x100(s["per_task"][t]) if t in s["per_task"] else "" for t in tasks],
              _x100(s["mean"]), f"{s['seconds']['mean']:.1f}"]
             for m, s in summary.items()]  # fmt: skip
    loss_lines = [[t, f"{v['original_loss']:.4g}", f"{v['constant_loss']:.4g}"]
                  for t, v in results["tasks"].items()]  # fmt: skip
    m = results["machine"]
    text = [
        f"# {results['name']}",
        "",
        f"Heterogeneous tasks on {cfg['dataset']}: {cfg['arch']} {cfg['arch_args']} encoders "
        f"(embedding {cfg['embed_dim']}), one per task, each with its own decoder; "
        f"{len(results['pairs'])} encoder pair(s) merged with every method. Scaled performance "
        "x100 = 100 (L_const - L_merged) / (L_const - L_original), mean ± std over the pairs "
        "holding the task; 100 = as good as the original, 0 = as bad as a constant predictor. "
        + (
            "Each task keeps its own encoder head (fed through the unmerge matrix)."
            if cfg["hetero"]["keep_heads"]
            else "The whole encoder, head included, is merged."
        ),
        "",
        _md_table(header, lines),
        "",
        _md_table(["task", "original loss (test)", "constant-predictor loss"], loss_lines),
        "",
        f"Machine: {m['cpu']}, {m['nproc']} cores, device {m['device']}, torch {m['torch']}. "
        f"Created {results['created']}; this invocation took {results['wall_seconds']:.0f} s "
        f"(trained {results['work']['trained']} encoders, ran {results['work']['merged']} "
        "merges; the rest was reused).",
    ]
    for p in results["pairs"]:
        rows = [[meth, *[f"{100 * s:.1f}" for s in r["scaled"]], f"{100 * r['mean']:.1f}",
                 "" if r["alpha"] is None else f"{r['alpha']:g}"]
                for meth, r in p["rows"].items()]  # fmt: skip
        text += ["", f"## {p['tasks'][0]} + {p['tasks'][1]}", "",
                 _md_table(["method", *p["tasks"], "mean", "alpha"], rows)]  # fmt: skip
    return "\n".join(text) + "\n"


def write_hetero_results(out: Path, results: dict[str, Any]) -> None:
    """results.json, results.csv, results.md, results.png (atomic writes)."""
    from mudsc.atomic import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    lines = ["pair,method,task,loss,scaled,alpha,merge_seconds"]
    for p in results["pairs"]:
        for meth, r in p["rows"].items():
            for i, task in enumerate(p["tasks"]):
                lines.append(f"{'+'.join(p['tasks'])},{meth},{task},{r['loss'][i]:.6g},"
                             f"{r['scaled'][i]:.6g},{'' if r['alpha'] is None else r['alpha']},"
                             f"{r['seconds']:.4g}")  # fmt: skip
    atomic_write_text(out / "results.csv", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.md", hetero_markdown(results))
    summary = results["summary"]
    methods = list(summary)
    series = {
        t: ([100 * summary[m]["per_task"][t]["mean"] for m in methods],
            [100 * summary[m]["per_task"][t]["std"] for m in methods])
        for t in results["tasks"]
        if all(t in summary[m]["per_task"] for m in methods)
    }  # fmt: skip
    series["mean"] = ([100 * summary[m]["mean"]["mean"] for m in methods],
                      [100 * summary[m]["mean"]["std"] for m in methods])  # fmt: skip
    title = f"{results['name']}: scaled performance per task (mean ± std over pairs)"
    bar_chart(out / "results.png", title, methods, series, "scaled performance x100", None)
