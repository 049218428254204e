"""``mudsc experiment``: config validation, a micro run end to end, resuming, the CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures_data import write_cifar_dataset
from typer.testing import CliRunner

from mudsc.cli import app
from mudsc.data import ImageDataset
from mudsc.errors import MudscError
from mudsc.experiments import (
    POOLS,
    ExperimentConfig,
    PoolEntry,
    check_experiment,
    classification,
    runner,
)
from mudsc.experiments.classification import pair_tasks
from mudsc.experiments.config import load_config, parse_config
from mudsc.methods import method_names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MICRO = {
    "dataset": "embedded",
    "arch": "mlp",
    "arch_args": {"hidden": 32, "depth": 1},
    "embed_dim": 16,
    "pairs": 1,
    "train": {"epochs": 2, "batch_size": 50, "lr": 0.05, "warmup_epochs": 0.2, "augment": False},
    "train_images_per_class": 30,
    "test_images_per_class": 10,
    "calibration": {"size": 80, "batch_size": 40, "holdout": 0.25},
    "alpha_grid": [0.3, 0.7],
    "merge": {"max_sweeps": 3, "patience": 1},
}


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("micro")
    cfg = parse_config({**MICRO, "output_dir": str(root / "out")}, name="micro")
    results = runner.run_experiment(cfg)
    return root / "out", results


def test_micro_run_writes_every_output_with_sane_values(micro: tuple[Path, dict]) -> None:
    out, results = micro
    for name in ("results.md", "results.csv", "results.json", "results.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    rows = saved["pairs"][0]["rows"]
    expected = {"model 0", "model 1", "ensemble", *method_names()}
    assert set(rows) == expected and set(saved["summary"]) == expected
    for name, row in rows.items():
        values = [row["joint"], row["avg"], *row["per_task"]]
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in values), name
        assert len(row["per_task"]) == 2
    for method in method_names():
        assert rows[method]["seconds"] >= 0
    # the MuDSC methods report the alpha chosen from the grid, the others none
    assert rows["mudsc-zip"]["alpha"] in (0.3, 0.7) and rows["zipit"]["alpha"] is None
    assert set(rows["mudsc-align"]["alpha_scores"]) == {"0.3", "0.7"}
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 3 * len(expected)  # pair 0, mean, std
    md = (out / "results.md").read_text()
    assert all(f"| {m} |" in md for m in method_names())
    # source models score their own task from their own classes only
    tasks = saved["pairs"][0]["tasks"]
    assert sorted(tasks[0] + tasks[1]) == list(range(10))


def test_resume_redoes_only_what_is_missing(
    micro: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = micro
    pair = out / "pairs" / "pair-0"
    shutil.rmtree(pair / "model-1")
    (pair / "merges" / "zipit.json").unlink()
    (pair / "merges" / "avg.json").write_text('{"key": {"config": ')  # torn, non-atomic write
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    leftover = pair / f".model-1.mudsc-{dead}-x1y2.partial"  # a killed run's temporaries
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    (pair / "merges" / f".wzip.json.mudsc-{dead}-abc.partial").write_text("{")
    trained, merged = [], []
    real_train, real_merge = classification.train_source, runner.run_merge

    def count_train(*args, **kwargs):
        trained.append(args[2])
        return real_train(*args, **kwargs)

    def count_merge(models, batches, method, *args, **kwargs):
        merged.append(method)
        return real_merge(models, batches, method, *args, **kwargs)

    monkeypatch.setattr(classification, "train_source", count_train)
    monkeypatch.setattr(runner, "run_merge", count_merge)
    cfg = parse_config({**MICRO, "output_dir": str(out)}, name="micro")
    results = runner.run_experiment(cfg)
    assert len(trained) == 1  # only model 1 of pair 0
    assert sorted(merged) == ["avg", "zipit"]  # retrained model-1 is bit-identical
    assert results["work"] == {"trained": 1, "merged": 2}
    assert not leftover.exists() and not list(out.rglob("*.partial"))
    assert (pair / "model-1" / "model.safetensors").is_file()

    # a third run reuses everything
    trained.clear()
    merged.clear()
    runner.run_experiment(cfg)
    assert trained == [] and merged == []


def test_changed_config_refuses_the_old_output(micro: tuple[Path, dict]) -> None:
    out, _ = micro
    raw = {**MICRO, "output_dir": str(out), "train": {**MICRO["train"], "epochs": 3}}
    with pytest.raises(MudscError, match="different configuration.*train.*--force"):
        runner.run_experiment(parse_config(raw, name="micro"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epoch": 3}, r"unknown config key 'epoch'.*valid keys: kind, name, dataset"),
        ({"methods": ["zipit", "bogus"]}, r"'methods': 'bogus' is not valid; choose one of avg"),
        ({"alpha": 1.5}, r"'alpha' must be a number in \[0, 1\] or 'auto'"),
        ({"alpha": "best"}, r"'alpha' must be a number in \[0, 1\] or 'auto'"),
        ({"dataset": None}, r"'dataset' is missing; set it to one of embedded"),
        ({"dataset": "imagenet"}, r"'dataset': 'imagenet' is not valid; choose one of"),
        ({"kind": "regression"}, r"'kind': 'regression' is not valid; choose one of classif"),
        ({"train": {"lr": -1}}, r"'train.lr' must be a number in \(0, 1000\]"),
        ({"train": {"lr": 0.1, "nesterov": True}}, r"unknown config key 'train.nesterov'"),
        ({"pairs": 2, "split_seeds": [1]}, r"'split_seeds' must be a list of 2 integers"),
        ({"model_seeds": [[1, 1]]}, r"model_seeds\[0\]' must give each model its own seed"),
        ({"merge": {"zip_b": 2}}, r"config section 'merge': zip_b"),
        ({"calibration": {"size": "many"}}, r"'calibration.size' must be an integer >= 2"),
        ({"arch": "resnet21"}, r"'arch': 'resnet21' is not valid; choose one of"),
        ({"noise_std": 0.3}, r"unknown config key 'noise_std' \(kind 'classification'\)"),
    ],
)
def test_malformed_configs_fail_clearly(change: dict, message: str) -> None:
    raw = {**MICRO, **change}
    raw = {k: v for k, v in raw.items() if not (k == "dataset" and v is None)}
    with pytest.raises(MudscError, match=message):
        parse_config(raw)


class _TrivialPool:
    """A kind of experiment with nothing to train or merge (registry tests only)."""

    row_keys = ()

    def __init__(self, cfg: ExperimentConfig, data: ImageDataset, device, progress) -> None:
        self.cfg, self.data = cfg, data

    def check(self) -> str:
        return f"trivial over {len(self.data.class_names)} classes, head seed {self.cfg.head_seed}"


def test_register_task_pool_kind_then_unregister() -> None:
    trivial = PoolEntry(
        "test-trivial",
        _TrivialPool,
        keys=("head_seed",),
        fields=lambda raw: {"head_seed": raw.get("head_seed", 0)},
        embed_dim=8,
    )
    raw = {"kind": "test-trivial", "dataset": "embedded", "arch": "mlp", "head_seed": 3}
    POOLS.register(trivial)
    try:
        cfg = parse_config(raw)
        assert (cfg.kind, cfg.embed_dim, cfg.head_seed, cfg.hetero) == ("test-trivial", 8, 3, None)
        assert check_experiment(cfg) == "trivial over 10 classes, head seed 3"
        with pytest.raises(MudscError, match=r"unknown config key 'pairs' \(kind 'test-trivial'\)"):
            parse_config({**raw, "pairs": 2})
        with pytest.raises(MudscError, match="an experiment kind named 'test-trivial' is already"):
            POOLS.register(trivial)
    finally:
        POOLS.unregister("test-trivial")
    assert POOLS.names() == ["classification", "hetero"]
    with pytest.raises(MudscError, match="'kind': 'test-trivial' is not valid; choose one of"):
        parse_config(raw)


def test_cli_reports_config_errors_in_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.yaml", {**MICRO, "methods": ["zipit", "bogus"]})
    result = CliRunner().invoke(app, ["experiment", str(path)])
    assert result.exit_code == 2
    assert "bogus" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["experiment", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())


def test_data_dependent_checks_fail_before_training(tmp_path: Path) -> None:
    cfg = parse_config({**MICRO, "calibration": {"size": 1000}})
    with pytest.raises(MudscError, match="'calibration.size' \\(1000\\) exceeds the 300"):
        check_experiment(cfg)  # 30 images per class
    cfg = parse_config({**MICRO, "embed_dim": 4})
    with pytest.raises(MudscError, match="'embed_dim' \\(4\\) must be >= the 10 classes"):
        check_experiment(cfg)


@pytest.mark.parametrize(
    ("config", "classes", "n"),
    [("cifar10-5+5-resnet20x4.yaml", 10, 1000), ("cifar100-50+50-resnet20x8.yaml", 100, 2000)],
)
def test_cifar_configs_validate_against_a_fixture_folder(
    tmp_path: Path, config: str, classes: int, n: int
) -> None:
    write_cifar_dataset(tmp_path, num_classes=classes, n=n)
    raw = yaml.safe_load((CONFIGS / config).read_text())
    assert raw["train"]["epochs"] == 200 and raw["train"]["batch_size"] == 500
    assert raw["train"]["lr"] == 0.4 and raw["train"]["warmup_epochs"] == 5
    path = _write(tmp_path / config, {**raw, "data_dir": str(tmp_path)})
    cfg = load_config(path)
    splits = pair_tasks(cfg, classes)
    assert check_experiment(cfg) == f"{cfg.pairs} pair(s), class splits {splits}"
    assert len(splits) == cfg.pairs and all(len(s) == 2 for s in splits)
    assert all(len(t) == classes // 2 for s in splits for t in s)
    result = CliRunner().invoke(app, ["experiment", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_every_shipped_config_loads() -> None:
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert len(paths) >= 9
    for path in paths:
        cfg = load_config(path)
        assert cfg.methods and cfg.output_dir
