"""``mudsc merge``: sources in, one merged model with its merge card out.

The sources are mudsc checkpoints (calibration drawn from their dataset, or read from
``--calibration FILE``) or local Hugging Face model directories (calibration from the
file only; the result is again a Hugging Face directory). The merge knobs are
:class:`~mudsc.merge.MergeConfig`'s fields, turned into options by
:func:`~mudsc.cli.options.config_options`; ``--method`` lists the method registry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import typer

from mudsc import distributed
from mudsc.cli.common import (
    check_output,
    console,
    emit_json,
    friendly,
    progress_bars,
    resolve_device,
)
from mudsc.cli.options import config_options, given
from mudsc.data.calibration import check_labelled_holdout
from mudsc.data.files import TensorFile, read_tensor_file, split_batches
from mudsc.errors import CheckpointError, ConfigError, DataError
from mudsc.inputs import existing_directory, regular_file
from mudsc.merge import MergeConfig, MergeResult
from mudsc.methods import METHODS
from mudsc.presets import presets_help


def method_help() -> str:
    """``--method`` help, generated from the registry: every method with its description
    and reference."""
    return "; ".join(f"{name}: {m.description} ({m.reference})" for name, m in METHODS.items())


def _held_out_score(
    held: tuple[torch.Tensor, torch.Tensor] | None,
    head: Any,
    tasks: list[list[int]],
    device: torch.device,
    batch_size: int,
) -> Callable[[Any], float] | None:
    """Score of an alpha candidate: average per-task accuracy on the held-out slice."""
    if held is None or head is None or not tasks:
        return None
    from mudsc.evaluate import evaluate

    def score(candidate: Any) -> float:
        return evaluate(candidate.model, held[0], held[1], tasks, head, device, batch_size).avg

    return score


def _logits_score(
    held: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device, batch_size: int
) -> Callable[[Any], float] | None:
    """Score of an alpha candidate of a model with logits: accuracy on the held-out slice."""
    if held is None:
        return None
    from mudsc.hf import accuracy

    def score(candidate: Any) -> float:
        return accuracy(candidate.model, held[0], held[1], batch_size, device)

    return score


def _stop_at(stop_at: str | None, stop_after_spaces: int | None) -> str | int | None:
    if stop_at is not None and stop_after_spaces is not None:
        raise ConfigError("give either --stop-at or --stop-after-spaces, not both")
    return stop_at if stop_at is not None else stop_after_spaces


def source_kind(paths: list[Path]) -> str:
    """``"hf"`` when every source is a Hugging Face directory, ``"checkpoint"`` when none is;
    a mix is refused (one merge, one kind of model)."""
    from mudsc.hf import is_hf_directory

    for path in paths:
        if not path.exists() and not path.is_symlink():
            raise CheckpointError(
                f"source {path} does not exist (sources are local checkpoints or Hugging Face "
                "directories; nothing is downloaded)"
            )
        existing_directory(path, "source", CheckpointError)
    hf = [p for p in paths if is_hf_directory(p)]
    if hf and len(hf) != len(paths):
        other = [str(p) for p in paths if p not in hf]
        raise CheckpointError(
            f"all sources must be of one kind: {', '.join(map(str, hf))} "
            f"are Hugging Face directories but {', '.join(other)} are not"
        )
    return "hf" if hf else "checkpoint"


def hold_out(
    file: TensorFile, holdout: float | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The file's inputs to fit on, and, when ``holdout`` is given and the file has labels,
    its last examples kept aside labelled (as many as a dataset draw would keep)."""
    if holdout is None or file.labels is None:
        return file.inputs, None
    cut = len(file) - max(1, int(len(file) * holdout))
    if cut < 1:
        raise DataError(f"a holdout of {holdout} leaves no calibration inputs in {file.path}; "
                        "lower --holdout or give more examples")  # fmt: skip
    check_labelled_holdout(len(file) - cut, int(file.labels.unique().numel()), holdout)
    return file.inputs[:cut], (file.inputs[cut:], file.labels[cut:])


@friendly
@distributed.launched
@config_options(
    MergeConfig, into="settings", skip={"alpha_grid", "device", "stop_at"},
    types={"alpha": str}, helps={"method": method_help(), "preset": presets_help()},
    panel="Merge settings",
    ranges={"zip_a": (0, 1), "zip_b": (0, 1), "max_sweeps": (1, None), "patience": (1, None),
            "tolerance": (0, None), "seed": (0, None), "alpha_repair_batches": (0, None)},
)  # fmt: skip
def merge_command(
    checkpoints: list[Path] = typer.Argument(
        ..., help="Two or more source checkpoints, or local Hugging Face model directories."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Merged model directory."),
    data: str = typer.Option(
        None, "--data", help="Calibration dataset (default: the checkpoints')."
    ),
    data_dir: Path = typer.Option(None),
    calibration: Path = typer.Option(
        None,
        "--calibration",
        help="Calibration inputs from a file instead of a dataset (required for Hugging Face "
        "models): a tensor of token ids or images as the model takes them, in .pt, "
        ".safetensors or .npz (keys inputs, optional labels) or .npy.",
    ),
    calibration_size: int = typer.Option(
        None,
        min=1,
        help="Calibration examples (default: 1000 drawn from the dataset, or the whole "
        "--calibration file).",
    ),
    batch_size: int = typer.Option(250, min=1),
    stop_at: str = typer.Option(
        None, help="Partial merge: merge up to this module path (e.g. layer2); heads stay."
    ),
    stop_after_spaces: int = typer.Option(
        None, min=1, help="Partial merge: merge the first K spaces (instead of --stop-at)."
    ),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing output that mudsc wrote."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the merge card as JSON on stdout (progress on stderr)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print spaces, memory per stage and forward passes; exit."
    ),
    *,
    settings: dict[str, Any],
) -> None:
    """Merge source models into one and save it with its merge card.  Under torchrun the
    ranks share the calibration passes and rank 0 alone writes."""
    from mudsc.atomic import refuse_existing

    check_output(output, [*checkpoints, *([calibration] if calibration else [])])
    refuse_existing(output, force)
    dev = distributed.local_device(resolve_device(device))
    config = _config(settings, str(dev), _stop_at(stop_at, stop_after_spaces))
    if len(checkpoints) < 2:
        raise ConfigError("merge needs at least two checkpoints")
    if calibration is not None and data is not None:
        raise ConfigError("give either --data (draw calibration from a dataset) or "
                          "--calibration FILE, not both")  # fmt: skip
    kind = source_kind(checkpoints)
    file = None
    if calibration is not None:
        file = read_tensor_file(regular_file(calibration, "--calibration file"))
        file = file.head(calibration_size)
    if dry_run:
        from mudsc.cli.dry_run import dry_run as report_dry_run

        dataset = (data, data_dir, calibration_size or 1000)
        return report_dry_run(checkpoints, kind, file, dataset, batch_size, config)
    if kind == "hf":
        merged = _merge_hf(checkpoints, output, file, batch_size, config, force)
    else:
        source = file if file is not None else (data, data_dir, calibration_size or 1000)
        merged = _merge_checkpoints(checkpoints, output, source, batch_size, config, force)
    if merged is None:  # a rank other than 0: rank 0 saves and reports
        return
    result, card = merged
    if as_json:
        emit_json({"output": str(output), **card})
    else:
        _report(output, result)


def _config(settings: dict[str, Any], device: str, stop_at: str | int | None) -> MergeConfig:
    """The ``--preset``'s config with the options the user gave on top (a default does not
    override the preset's value)."""
    explicit = {k: v for k, v in given(settings).items() if k != "preset"}
    if stop_at is not None:
        explicit["stop_at"] = stop_at
    return MergeConfig.from_preset(settings["preset"], **explicit, device=device)


def _auto_holdout(config: MergeConfig) -> float | None:
    """The holdout share when the merge scores alpha candidates, else None."""
    auto = METHODS[config.method].uses_alpha and config.alpha == "auto"
    return config.holdout if auto else None


def _merge_hf(
    paths: list[Path],
    output: Path,
    file: TensorFile | None,
    batch_size: int,
    config: MergeConfig,
    force: bool,
) -> tuple[MergeResult, dict[str, Any]] | None:
    """Merge Hugging Face directories on the file's inputs; save a Hugging Face directory."""
    from mudsc.hf import load_hf_model, save_hf_model

    if file is None:
        raise ConfigError(
            "merging Hugging Face models needs --calibration FILE: a tensor of inputs the "
            "models take (token ids), as .pt, .safetensors, .npz or .npy"
        )
    if config.stop_at is not None:
        raise ConfigError("a partial merge (--stop-at) of Hugging Face models has no Hugging "
                          "Face form to save; merge the whole models")  # fmt: skip
    holdout = _auto_holdout(config)
    if holdout is not None and file.labels is None:
        raise DataError("--alpha auto on Hugging Face models scores each alpha on labelled "
                        "held-out inputs: give the --calibration file 'labels', or a fixed "
                        "--alpha")  # fmt: skip
    fit, held = hold_out(file, holdout)
    dev = torch.device(config.device)
    models = [load_hf_model(p, dev) for p in paths]
    score_fn = _logits_score(held, dev, batch_size)
    result = _run(models, split_batches(fit.to(dev), batch_size), config, score_fn)
    if not distributed.is_root():
        return None
    card = _card(result, paths, {"file": str(file.path), "inputs": len(file)})
    if score_fn is not None:
        card["alpha_score"] = "accuracy of argmax(logits) on a held-out labelled slice"
    card["architecture"] = type(result.model).__name__
    save_hf_model(output, result.model, card, force=force)
    return result, card


def _merge_checkpoints(
    paths: list[Path],
    output: Path,
    source: TensorFile | tuple[str | None, Path | None, int],
    batch_size: int,
    config: MergeConfig,
    force: bool,
) -> tuple[MergeResult, dict[str, Any]] | None:
    """Merge mudsc checkpoints on a file's inputs or a dataset draw; save a checkpoint."""
    from mudsc.checkpoint import load_checkpoint, save_checkpoint

    dev = torch.device(config.device)
    loaded = [load_checkpoint(p, dev) for p in paths]
    tasks = [t for ck in loaded for t in ck.tasks]
    head = loaded[0].head
    if isinstance(source, TensorFile):
        name = loaded[0].dataset
        fit, held = hold_out(source, _auto_holdout(config) if head is not None else None)
        batches = split_batches(fit.to(dev), batch_size)
        provenance: dict[str, Any] = {"file": str(source.path), "inputs": len(source)}
    else:
        name, batches, held = draw_from_dataset(source, loaded, tasks, batch_size, config)
        provenance = {"dataset": name, "images": source[2], "seed": config.seed}
    score_fn = _held_out_score(held, head, tasks, dev, batch_size)
    result = _run([ck.model for ck in loaded], batches, config, score_fn)
    if not distributed.is_root():
        return None
    card = _card(result, paths, provenance)
    if score_fn is not None:
        card["alpha_score"] = "average per-task accuracy on a held-out labelled slice"
    save_checkpoint(
        output, result.model,
        {
            "kind": "merge", "dataset": name, "tasks": tasks, "merge": card,
            "arch": loaded[0].config["arch"], "arch_args": loaded[0].config.get("arch_args", {}),
        },
        head, force=force,
    )  # fmt: skip
    return result, card


def draw_from_dataset(
    source: tuple[str | None, Path | None, int],
    loaded: list[Any],
    tasks: list[list[int]],
    batch_size: int,
    config: MergeConfig,
) -> tuple[str, list[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """Calibration drawn from the dataset (``--data`` or the checkpoints')."""
    from mudsc.data import draw_calibration, load_dataset

    data, data_dir, size = source
    name = data or loaded[0].dataset
    if name is None:
        raise ConfigError("the checkpoints record no dataset; pass --data NAME or "
                          "--calibration FILE for calibration")  # fmt: skip
    dataset = load_dataset(name, data_dir)
    classes = sorted({c for t in tasks for c in t}) or list(range(dataset.num_classes))
    calibration = draw_calibration(dataset, classes, size, batch_size, config.seed,
                                   config.device, holdout=_auto_holdout(config))  # fmt: skip
    return name, calibration.batches, calibration.held


def _run(
    models: list[torch.nn.Module],
    batches: list[torch.Tensor],
    config: MergeConfig,
    score_fn: Callable[[Any], float] | None,
) -> MergeResult:
    from mudsc.merge import merge_models

    with progress_bars() as progress:
        shown = progress if distributed.is_root() else None
        return merge_models(models, batches, config, score_fn=score_fn, progress=shown)


def _card(
    result: MergeResult,
    paths: list[Path],
    calibration: dict[str, Any],
) -> dict[str, Any]:
    """The merge card: the result's record, the sources and where calibration came from."""
    card = result.card()
    card["sources"] = [str(p) for p in paths]
    card["calibration"] = calibration
    return card


def _report(output: Path, result: MergeResult) -> None:
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    chosen = "" if result.alpha is None else f", alpha {result.alpha:g}"
    console.print(f"saved {output} ({result.config.method}{chosen}; {timing})")
