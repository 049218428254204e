"""Heterogeneous tasks: task batches, constant predictors, per-task heads, a micro run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mudsc.errors import MudscError
from mudsc.experiments import hetero, hetero_tasks, run_experiment
from mudsc.experiments.config import parse_config
from mudsc.experiments.sources import prepare_dataset
from mudsc.merge import MergeConfig, merge_models
from mudsc.methods import method_names
from mudsc.models import create

MICRO = {
    "kind": "hetero",
    "dataset": "embedded",
    "arch": "mlp",
    "arch_args": {"hidden": 64, "depth": 2},
    "embed_dim": 16,
    "tasks": ["classification", "autoencode"],
    "train": {"epochs": 10, "batch_size": 50, "lr": 0.1, "warmup_epochs": 0.2, "augment": False},
    "train_images_per_class": 40,
    "test_images_per_class": 10,
    "calibration": {"size": 80, "batch_size": 40, "holdout": 0.25},
    "alpha_grid": [0.3, 0.7],
    "merge": {"max_sweeps": 3, "patience": 1},
}


def test_rotation_batch_rotates_each_image_by_its_label() -> None:
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4).repeat(4, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    inputs, turns = hetero_tasks.task_batch("rotation", x, torch.zeros(8), gen, 0.5)
    for i in range(8):
        assert torch.equal(inputs[i], torch.rot90(x[i], int(turns[i]), dims=(1, 2)))
    clean = torch.zeros(3, 1, 4, 4)
    noisy, target = hetero_tasks.task_batch("denoise", clean, torch.zeros(3), gen, 0.5)
    assert torch.equal(target, clean) and 0.3 < noisy.std() < 0.7


def test_constant_losses_are_those_of_the_best_constant() -> None:
    cfg = parse_config({**MICRO})
    data = prepare_dataset(cfg)
    labels = data.test_labels
    assert hetero_tasks.constant_loss("classification", data, labels) == pytest.approx(math.log(10))
    assert hetero_tasks.constant_loss("rotation", data, labels) == pytest.approx(math.log(4))
    images = data.normalize(data.test_images)
    mse = hetero_tasks.constant_loss("autoencode", data, images)
    assert 0 < mse < ((images - images.mean() - 1) ** 2).mean()


def test_per_task_heads_reproduce_a_self_merge_exactly() -> None:
    torch.manual_seed(0)
    model = create("mlp", in_channels=1, image_size=8, embed_dim=6, hidden=16, depth=2).eval()
    perm = create("mlp", in_channels=1, image_size=8, embed_dim=6, hidden=16, depth=2).eval()
    perm.load_state_dict(model.state_dict())
    x = torch.randn(64, 1, 8, 8)
    result = merge_models([model, perm], [x], MergeConfig(method="act-align", repair="none"))
    space = hetero.head_input_space(result.spec, model)
    encoders = hetero.per_task_encoders(result, [model, perm], keep_heads=True)
    assert result.matches[space].unmerge_of(1).shape == (16, 16)
    for enc in encoders:
        torch.testing.assert_close(enc(x), model(x), atol=1e-5, rtol=1e-5)


def test_undefined_scaled_performance_is_a_clear_error() -> None:
    with pytest.raises(MudscError, match="no better than a constant predictor.*train.epochs"):
        hetero_tasks.scaled_performance(1.0, 0.5, 1.2, "autoencode")
    assert hetero_tasks.scaled_performance(2.0, 1.5, 1.0, "x") == pytest.approx(0.5)


def test_micro_hetero_run_scores_every_task_and_method(tmp_path: Path) -> None:
    cfg = parse_config({**MICRO, "output_dir": str(tmp_path / "out")}, name="hmicro")
    results = run_experiment(cfg)
    out = tmp_path / "out"
    for name in ("results.md", "results.csv", "results.json", "results.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert [p["tasks"] for p in saved["pairs"]] == [["classification", "autoencode"]]
    assert set(saved["summary"]) == set(method_names())
    for method, s in saved["summary"].items():
        assert set(s["per_task"]) == {"classification", "autoencode"}, method
        values = [v["mean"] for v in s["per_task"].values()]
        assert all(math.isfinite(v) and v < 1.5 for v in values), (method, values)
    for t, losses in saved["tasks"].items():
        assert losses["original_loss"] < losses["constant_loss"], t
    md = (out / "results.md").read_text()
    assert all(f"| {m} |" in md for m in method_names())
    assert results["work"]["merged"] == len(method_names())
    # resume: nothing is redone
    again = run_experiment(cfg)
    assert again["work"] == {"trained": 0, "merged": 0}
    assert again["summary"] == results["summary"]
