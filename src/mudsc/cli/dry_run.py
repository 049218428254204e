"""``mudsc merge --dry-run``: the spaces, the memory per stage and the forward passes of a
merge, printed before any calibration pass; nothing is written."""

from __future__ import annotations

from pathlib import Path

import torch

from mudsc.cli.common import console
from mudsc.cli.merge import draw_from_dataset
from mudsc.data.files import TensorFile, split_batches
from mudsc.errors import ConfigError
from mudsc.estimate import MergeEstimate, human, plan_merge
from mudsc.memory import available_bytes
from mudsc.merge import MergeConfig


def dry_run(
    paths: list[Path],
    kind: str,
    file: TensorFile | None,
    dataset: tuple[str | None, Path | None, int],
    batch_size: int,
    config: MergeConfig,
) -> None:
    """Load the sources and the calibration inputs, trace, estimate and print."""
    dev = torch.device(config.device)
    if kind == "hf":
        from mudsc.hf import load_hf_model

        if file is None:
            raise ConfigError("a dry run of Hugging Face models needs --calibration FILE too")
        models = [load_hf_model(p, dev) for p in paths]
    else:
        from mudsc.checkpoint import load_checkpoint

        loaded = [load_checkpoint(p, dev) for p in paths]
        models = [ck.model for ck in loaded]
        if file is None:
            tasks = [t for ck in loaded for t in ck.tasks]
            _, batches, _ = draw_from_dataset(dataset, loaded, tasks, batch_size, config)
            return report(plan_merge(models, batches, config))
    report(plan_merge(models, split_batches(file.inputs.to(dev), batch_size), config))


def report(estimate: MergeEstimate) -> None:
    """The estimate as a few aligned lines on the console."""
    e = estimate
    head = f"dry run: {e.method}, {e.n_models} models on {e.device}, {e.batches} calibration"
    console.print(f"{head} batches ({e.examples} inputs); nothing was run or written")
    w = max((len(s.name) for s in e.spaces), default=5)
    console.print(f"{'space':<{w}} {'n':>6} {'groups':>6} {'N*n':>7} {'(N*n)^2 f64':>12} stats")
    for s in e.spaces:
        console.print(f"{s.name:<{w}} {s.size:>6} {s.groups:>6} {s.stacked:>7} "
                      f"{human(s.matrix_bytes):>12} {'yes' if s.observed else 'no'}")  # fmt: skip
    console.print(f"memory above the loaded sources ({human(e.source_bytes)}):")
    for stage, size in e.stages.items():
        console.print(f"  {stage:<12} {human(size):>12}")
    free = available_bytes(e.device)
    verdict = "unknown free memory" if free is None else (
        f"{human(free)} free: fits" if e.peak_bytes <= free else
        f"{human(free)} free: would NOT fit (the merge refuses; --no-memory-check overrides)"
    )  # fmt: skip
    console.print(f"  {'peak':<12} {human(e.peak_bytes):>12} ({e.peak_stage}); {verdict}")
    passes = ", ".join(f"{k} {v:g}" for k, v in e.passes.items())
    console.print(f"forward passes over the calibration data (one model, every batch): {passes}")
    for note in e.notes:
        console.print(note)
