"""Issue 12, item 3 and the library side of item 4: no silently wrong result, and every
mistake a library user can make with evaluate / merge / train / the datasets is one line
of the fitting MudscError subclass, found before the work starts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke
from torch import nn

from mudsc import merge as merge_module
from mudsc import stages
from mudsc.checkpoint import save_checkpoint
from mudsc.data import (
    ImageDataset,
    MemorySource,
    draw_calibration,
    iterate_batches,
    limit_per_class,
    load_dataset,
)
from mudsc.data.base import channel_stats
from mudsc.errors import CheckpointError, ConfigError, DataError, SpecError
from mudsc.evaluate import evaluate
from mudsc.merge import MergeConfig, merge_models
from mudsc.models import create
from mudsc.models.head import ClassEmbeddingHead
from mudsc.train import TrainConfig, train

CLASSES = 4
TASKS = [[0, 1], [2, 3]]


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def mlp(seed: int = 0, channels: int = 1, size: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return create("mlp", in_channels=channels, image_size=size, embed_dim=CLASSES, hidden=8)


def images(n: int = 16, channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(1))


def labels(n: int = 16) -> torch.Tensor:
    return torch.arange(n) % CLASSES


def tiny_dataset(n_train: int = 32, size: int = 8, name: str = "tiny") -> ImageDataset:
    gen = torch.Generator().manual_seed(0)
    train_x = torch.randint(0, 256, (n_train, 1, size, size), dtype=torch.uint8, generator=gen)
    test_x = torch.randint(0, 256, (8, 1, size, size), dtype=torch.uint8, generator=gen)
    mean, std = channel_stats(train_x)
    return ImageDataset(name, train_x, torch.arange(n_train) % CLASSES, test_x,
                        torch.arange(8) % CLASSES, list("abcd"), mean, std)  # fmt: skip


@pytest.fixture
def head() -> ClassEmbeddingHead:
    return ClassEmbeddingHead(torch.eye(CLASSES))


# --- 1. NaN / Inf weights, outputs, inputs ------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_evaluate_refuses_non_finite_weights(head, value: float) -> None:
    model = mlp()
    with torch.no_grad():
        next(model.parameters()).view(-1)[3] = value
    with pytest.raises(CheckpointError, match="NaN or infinite values in") as exc:
        evaluate(model, images(), labels(), TASKS, head)
    one_line(exc)


def test_evaluate_refuses_non_finite_outputs(head) -> None:
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1e30)  # finite weights whose products overflow float32
    with pytest.raises(CheckpointError, match="outputs contain NaN or infinite") as exc:
        evaluate(model, images(), labels(), TASKS, head)
    one_line(exc)


def test_evaluate_refuses_non_finite_images(head) -> None:
    x = images()
    x[2, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="images contain NaN"):
        evaluate(mlp(), x, labels(), TASKS, head)


def test_cli_eval_of_nan_checkpoint_is_one_line(tmp_path: Path, data_dir: Path) -> None:
    torch.manual_seed(0)
    arch_args = {"in_channels": 1, "image_size": 28, "embed_dim": 10, "hidden": 8}
    model = create("mlp", **arch_args)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    config = {"kind": "train", "dataset": "fashion-mnist", "tasks": [[0, 1, 2, 3, 4]],
              "arch": "mlp", "arch_args": arch_args}  # fmt: skip
    save_checkpoint(tmp_path / "bad", model, config, ClassEmbeddingHead(torch.eye(10)))
    result = invoke("eval", tmp_path / "bad", "--data-dir", data_dir)
    assert result.exit_code == 2, result.output
    assert "NaN or infinite" in result.output and "Traceback" not in result.output


# --- 2. too few calibration samples for activation statistics ---------------------------


def fast(method: str = "zipit", **kw) -> MergeConfig:
    return MergeConfig(method=method, max_sweeps=2, repair="none", **kw)


def test_thin_statistics_warn_once_with_the_advisable_count(caplog) -> None:
    models = [mlp(0), mlp(1)]
    with caplog.at_level(logging.WARNING, logger="mudsc.stages"):
        merge_models(models, [images(4)], fast())
    lines = [r.getMessage() for r in caplog.records if "too few" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    # the hidden space is 2 x 8 wide: 17 rows make its correlation full rank
    assert lines[0].startswith("4 calibration samples") and "17 or more samples" in lines[0]


def test_enough_samples_do_not_warn(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mudsc.stages"):
        merge_models([mlp(0), mlp(1)], [images(20)], fast())
    assert "too few" not in caplog.text


def test_one_sample_is_refused_before_statistics() -> None:
    with pytest.raises(DataError, match="at least 2 calibration samples") as exc:
        merge_models([mlp(0), mlp(1)], [images(1)], fast())
    one_line(exc)


def test_weight_only_methods_need_no_sample_count() -> None:
    merge_models([mlp(0), mlp(1)], [images(1)], fast("avg"))


# --- 3. a data dir for a dataset that reads no files ------------------------------------


def test_data_dir_for_a_built_in_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'embedded' needs no data dir") as exc:
        load_dataset("embedded", tmp_path)
    one_line(exc)
    assert isinstance(MemorySource("x", tiny_dataset).load(None), ImageDataset)


def test_cli_data_dir_for_embedded_is_one_line(tmp_path: Path) -> None:
    result = invoke("train", "-o", tmp_path / "x", "--dataset", "embedded",
                    "--data-dir", tmp_path, "--epochs", "1")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "needs no data dir" in result.output and not (tmp_path / "x").exists()


# --- 4. images of another shape than the model's -----------------------------------------


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 10, 10)])
def test_evaluate_zoo_model_on_other_shapes_names_both(head, shape) -> None:
    with pytest.raises(DataError) as exc:
        evaluate(mlp(), images(8, shape[0], shape[1]), labels(8), TASKS, head)
    text = one_line(exc)
    assert " x ".join(map(str, shape)) in text and "1 x 8 x 8" in text


def test_evaluate_other_model_rephrases_its_first_shape_error(head) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSES))
    with pytest.raises(DataError, match="cannot run on inputs of shape 1 x 10 x 10") as exc:
        evaluate(model, images(8, 1, 10), labels(8), TASKS, head)
    one_line(exc)


def test_merge_on_other_shapes_is_refused_before_tracing(monkeypatch) -> None:
    monkeypatch.setattr(merge_module, "trace_stage", _must_not_run)
    with pytest.raises(DataError, match="3 x 8 x 8 .* built for 1 x 8 x 8"):
        merge_models([mlp(0), mlp(1)], [images(8, channels=3)], fast())


def test_train_on_other_shapes_is_refused(head) -> None:
    with pytest.raises(DataError, match="1 x 8 x 8 .* built for 1 x 16 x 16"):
        train("mlp", tiny_dataset(), [0, 1], head, TrainConfig(epochs=1),
              arch_args={"image_size": 16, "hidden": 8})  # fmt: skip


# --- 5. no training images -----------------------------------------------------------------


def _must_not_run(*args, **kwargs):
    raise AssertionError("work started before the input was checked")


def test_dataset_without_training_images_is_refused() -> None:
    data = tiny_dataset()
    with pytest.raises(DataError, match="has no training images") as exc:
        ImageDataset(
            "empty", data.train_images[:0], data.train_labels[:0], data.test_images,
            data.test_labels, data.class_names, data.mean, data.std,
        )  # fmt: skip
    one_line(exc)


def test_task_without_training_images_is_refused_before_building(head, monkeypatch) -> None:
    data = tiny_dataset()
    keep = data.train_labels != 3
    data.train_images, data.train_labels = data.train_images[keep], data.train_labels[keep]
    monkeypatch.setattr("mudsc.train.create", _must_not_run)
    with pytest.raises(DataError, match="no images of classes \\[3\\]"):
        train("mlp", data, [3], head, TrainConfig(epochs=1))
    with pytest.raises(DataError, match="no training images of the classes \\[3\\]"):
        draw_calibration(data, [3], 4, 2, seed=0, device="cpu")


# --- 6. alpha auto with too little labelled data ----------------------------------------


def test_alpha_auto_needs_one_held_image_per_class() -> None:
    with pytest.raises(DataError, match="1 held-out labelled image.*4 classes") as exc:
        draw_calibration(tiny_dataset(), None, 8, 4, seed=0, device="cpu", holdout=0.2)
    assert "20 or more" in one_line(exc)
    cal = draw_calibration(tiny_dataset(), None, 20, 4, seed=0, device="cpu", holdout=0.2)
    assert cal.held is not None and len(cal.held[1]) == 4


def test_alpha_auto_with_one_sample_is_refused_before_tracing(monkeypatch) -> None:
    monkeypatch.setattr(merge_module, "trace_stage", _must_not_run)
    with pytest.raises(DataError, match="alpha='auto' .* at least 2"):
        merge_models([mlp(0), mlp(1)], [images(1)], fast("mudsc-align", alpha="auto"))


# --- 7. numeric arguments of the library entry points -------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epochs": 0}, "epochs=0"),
        ({"epochs": 1.5}, "epochs=1.5"),
        ({"batch_size": -4}, "batch_size=-4"),
        ({"batch_size": True}, "batch_size=True"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"lr": float("inf")}, "lr=inf"),
        ({"warmup_epochs": -1}, "warmup_epochs=-1"),
        ({"crop_padding": -1}, "crop_padding=-1"),
        ({"seed": "0"}, "seed='0'"),
    ],
)
def test_train_config_names_the_bad_field(kwargs, field: str) -> None:
    with pytest.raises(ConfigError, match="invalid training settings") as exc:
        TrainConfig(**kwargs)
    assert field in one_line(exc)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_sweeps": 0}, "max_sweeps"),
        ({"patience": 2.5}, "patience"),
        ({"tolerance": -1.0}, "tolerance"),
        ({"tolerance": float("nan")}, "tolerance"),
        ({"zip_a": float("nan")}, "zip_a"),
        ({"zip_b": 2.0}, "zip_b"),
        ({"holdout": 1.0}, "holdout"),
        ({"alpha": float("inf")}, "alpha"),
        ({"alpha_grid": (0.5, float("nan"))}, "alpha_grid"),
        ({"seed": 1.5}, "seed"),
        ({"device": "nonsense"}, "device"),
        ({"device": "meta"}, "device"),
        ({"repair": "maybe"}, "repair"),
    ],
)
def test_merge_config_names_the_bad_field(kwargs, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as exc:
        MergeConfig(**kwargs)
    one_line(exc)


@pytest.mark.parametrize("size", [0, -1, 2.0])
def test_batch_sizes_are_checked_where_they_enter(head, size) -> None:
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        evaluate(mlp(), images(), labels(), TASKS, head, batch_size=size)
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        draw_calibration(tiny_dataset(), None, 8, size, seed=0, device="cpu")
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        iterate_batches(images(), labels(), size, shuffle=False)


def test_other_library_arguments_are_config_errors(head) -> None:
    with pytest.raises(ConfigError, match="images per class \\(train\\)"):
        limit_per_class(tiny_dataset(), 0, None)
    with pytest.raises(ConfigError, match="calibration images"):
        draw_calibration(tiny_dataset(), None, 0, 4, seed=0, device="cpu")
    with pytest.raises(ConfigError, match="unknown merge option"):
        merge_module.merge([mlp(0), mlp(1)], [images(8)], batch=3)
    with pytest.raises(ConfigError, match="at least two models"):
        stages.check_models([mlp(0)])
    with pytest.raises(DataError, match="16 images but 15 labels"):
        evaluate(mlp(), images(), labels(15), TASKS, head)


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda m, b: merge_models([m, m], b, {"method": "zipit"}), ConfigError,
         "config must be a MergeConfig"),
        (lambda m, b: merge_models([1, m], b), ConfigError, "model 0 is of type int"),
        (lambda m, b: merge_models([m, m], [()]), DataError, "empty tuple"),
        (lambda m, b: merge_models([m, m], b, spec={}), SpecError, "spec must be a MergeSpec"),
    ],
)  # fmt: skip
def test_wrong_argument_types_to_merge_models_are_one_line(call, error, words) -> None:
    model = create("mlp", in_channels=1, image_size=8, embed_dim=6, width=0.05)
    batches = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    with pytest.raises(error, match=words):
        call(model, batches)
