"""Hugging Face model directories in and out, strictly local.

A directory written by ``save_pretrained`` (``config.json`` naming its ``model_type`` and
``architectures``, weights in ``model.safetensors``) is loaded with the class its config
names, from the ``transformers`` package itself: no hub look-up, no download, no remote
code. A merged model goes back out as such a directory, so ``from_pretrained`` loads it,
with mudsc's merge card beside the weights in its own file (``config.json`` stays the one
``transformers`` owns). ``transformers`` is an optional dependency (``mudsc[hf]``),
imported only here and only when a Hugging Face directory is actually used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mudsc.atomic import MERGE_CARD, atomic_directory
from mudsc.errors import CheckpointError, ConfigError, DataError, SpecError
from mudsc.evaluate import check_finite_weights
from mudsc.modes import eval_mode

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
MERGE_CARD_FILE = MERGE_CARD  # what marks the directory as mudsc's (--force may replace it)


def is_hf_directory(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose ``config.json`` is a Hugging Face model config."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            "Hugging Face models need the optional package transformers; "
            'install it with pip install -e ".[hf]" (or pip install "mudsc[hf]")'
        ) from exc
    return transformers


def _model_class(transformers: Any, config: Any, path: Path) -> type:
    """The class ``config.architectures`` names, looked up in ``transformers`` only."""
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        raise CheckpointError(
            f"{path / CONFIG_FILE} names no 'architectures'; re-save the model with "
            "save_pretrained so its config records its class"
        )
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        raise CheckpointError(
            f"unknown architecture {names[0]!r} in {path / CONFIG_FILE}: transformers "
            f"{transformers.__version__} has no such model class (remote code is never run)"
        )
    return cls


def load_hf_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a local Hugging Face model directory, in eval mode, on ``device``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a local directory; mudsc never downloads models: save one with "
            "save_pretrained (or huggingface-cli download) and pass that directory"
        )
    if not is_hf_directory(path):
        raise CheckpointError(f"{path} is not a Hugging Face model directory: its {CONFIG_FILE} "
                              "is missing or names no model_type / architectures")  # fmt: skip
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{path} has no {WEIGHT_FILES[0]}: the model directory is "
                              "incomplete (mudsc reads safetensors weights only)")  # fmt: skip
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        cls = _model_class(transformers, config, path)
        model = cls.from_pretrained(str(path), config=config, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise CheckpointError(f"cannot load the Hugging Face model in {path}: {first}") from exc
    return model.to(device).eval()


def save_hf_model(
    path: str | Path, model: nn.Module, card: Mapping[str, Any], force: bool = False
) -> Path:
    """Write ``model`` with ``save_pretrained`` and ``card`` as ``mudsc_merge.json``, the
    whole directory appearing at once (a temporary sibling renamed into place)."""
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"a {type(model).__name__} is not a Hugging Face model; only "
                          "transformers models are saved as model directories")  # fmt: skip

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        (tmp / MERGE_CARD_FILE).write_text(json.dumps(dict(card), indent=2))

    return atomic_directory(path, force, write)


def logits(output: Any) -> torch.Tensor:
    """The class scores of a model's output: ``.logits`` of a transformers output, or the
    tensor itself."""
    scores = getattr(output, "logits", output)
    if not isinstance(scores, torch.Tensor):
        raise SpecError(f"the model returns a {type(output).__name__} without logits; "
                        "scoring needs a classification head")  # fmt: skip
    return scores


@torch.no_grad()
def accuracy(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
) -> float:
    """Share of ``inputs`` whose ``argmax(logits)`` is the label (model in eval mode)."""
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    check_finite_weights(model)
    correct = 0
    with eval_mode(model):
        for start in range(0, len(inputs), batch_size):
            scores = logits(model(inputs[start : start + batch_size].to(device)))
            if not torch.isfinite(scores).all():
                raise CheckpointError("the model's logits hold NaN or infinite values; the "
                                      "model is broken (check its weights and config)")  # fmt: skip
            if scores.dim() != 2:
                raise SpecError(f"the model's logits have shape {tuple(scores.shape)}; "
                                "scoring needs one row of class scores per example")  # fmt: skip
            expected = labels[start : start + batch_size]
            if int(expected.max()) >= scores.shape[1] or int(expected.min()) < 0:
                raise DataError(f"labels must be class ids in 0..{scores.shape[1] - 1} "
                                "(the model scores that many classes)")  # fmt: skip
            correct += int((scores.argmax(dim=1).cpu() == expected).sum())
    return correct / len(inputs)
