"""The `train`, `eval` and `spec --list` commands, how they report user mistakes, and the
options derived from the config dataclasses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import typer
from cli_helpers import TRAIN_ARGS, flat, invoke
from typer.testing import CliRunner, Result

from mudsc.checkpoint import CONFIG_FILE, HEAD_FILE, MODEL_FILE, load_checkpoint
from mudsc.cli import app
from mudsc.cli.options import config_options
from mudsc.methods import METHODS
from mudsc.models import names
from mudsc.train import TrainConfig

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def assert_user_error(result: Result, *words: str) -> None:
    """Exit 2 with one clean ``error:`` line naming the problem, and no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stderr.lstrip().startswith("error:"), result.stderr
    for word in words:
        assert flat(word) in flat(result.stderr), (word, result.stderr)


def test_train_writes_a_checkpoint(runs: dict[str, Path]) -> None:
    run = runs["a"]
    assert sorted(p.name for p in run.iterdir()) == sorted([CONFIG_FILE, HEAD_FILE, MODEL_FILE])
    config = json.loads((run / CONFIG_FILE).read_text())
    assert config["arch"] == "mlp" and config["arch_args"]["hidden"] == 32
    assert config["arch_args"]["embed_dim"] == 32 and config["arch_args"]["image_size"] == 28
    assert config["dataset"] == "fashion-mnist" and config["tasks"] == [[0, 1, 2, 3, 4]]
    assert config["train"]["epochs"] == 2 and config["train"]["lr"] == 0.05
    assert [h["epoch"] for h in config["history"]] == [1, 2]
    loaded = load_checkpoint(run)
    assert loaded.head is not None and loaded.head.dim == 32 and loaded.head.num_classes == 10
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]


def test_eval_prints_a_table(runs: dict[str, Path], data_dir: Path) -> None:
    result = invoke("eval", runs["a"], "--data-dir", data_dir)
    assert result.exit_code == 0, result.output
    for word in ("joint", "task 0", "avg", "fashion-mnist test set (100 images)"):
        assert flat(word) in flat(result.stdout), result.stdout


def test_eval_json_single_and_ensemble(runs: dict[str, Path], data_dir: Path) -> None:
    result = invoke("eval", runs["a"], "--data-dir", data_dir, "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert {"joint", "per_task", "avg", "n_images"} <= set(row)
    assert len(row["per_task"]) == 1 and row["n_images"] == 100  # classes 0-4 of 200
    assert row["avg"] == row["per_task"][0] > 0.6  # the fixture classes are easy
    assert 0 <= row["joint"] <= 1

    both = invoke("eval", runs["a"], runs["b"], "--data-dir", data_dir, "--json")
    assert both.exit_code == 0, both.output
    row = json.loads(both.stdout)
    assert row["method"] == "ensemble" and row["n_images"] == 200 and len(row["per_task"]) == 2
    assert row["avg"] == pytest.approx(sum(row["per_task"]) / 2)

    custom = invoke("eval", runs["a"], "--data-dir", data_dir, "--tasks", "0,1;2,3", "--json")
    assert custom.exit_code == 0, custom.output
    assert json.loads(custom.stdout)["n_images"] == 80


def test_second_train_needs_force(runs: dict[str, Path], data_dir: Path) -> None:
    run = runs["a"]
    before = (run / MODEL_FILE).read_bytes()
    again = ["train", "-o", run, "--data-dir", data_dir, "--task", "0,1,2,3,4", *TRAIN_ARGS]
    result = invoke(*again)
    assert_user_error(result, "already exists", "--force")
    assert (run / MODEL_FILE).read_bytes() == before
    forced = invoke(*again, "--epochs", "1", "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((run / CONFIG_FILE).read_text())["train"]["epochs"] == 1


def test_unknown_arch_lists_valid_names(tmp_path: Path, data_dir: Path) -> None:
    result = invoke("train", "-o", tmp_path / "x", "--data-dir", data_dir, "--arch", "resnet21",
                    "--epochs", "1")  # fmt: skip
    assert_user_error(result, "unknown architecture 'resnet21'", *names())
    assert not (tmp_path / "x").exists()


def test_missing_dataset_lists_searched_paths(tmp_path: Path) -> None:
    missing = tmp_path / "no-data"
    result = invoke("train", "-o", tmp_path / "x", "--data-dir", missing, "--arch", "mlp")
    assert_user_error(result, "not found", str(missing), str(missing / "fashion-mnist"),
                      "apt-get install dataset-fashion-mnist")  # fmt: skip
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--task", "0,12"], ["class ids [12] are out of range", "0..9"]),
        (["--task", "a,b"], ["cannot parse"]),
        (["--task", "0,1", "--split", "5+5"], ["either --task or --split"]),
        (["--arch-args", "[1]"], ["--arch-args must be a JSON object"]),
        (["--lr", "-1"], ["invalid training settings", "lr=-1.0"]),
        (["--device", "tpu9"], ["unknown device"]),
    ],
    ids=["task-range", "task-parse", "task-and-split", "arch-args", "lr", "device"],
)
def test_bad_train_options_are_user_errors(tmp_path, data_dir, extra, words) -> None:
    result = invoke("train", "-o", tmp_path / "x", "--data-dir", data_dir, *TRAIN_ARGS, *extra)
    assert_user_error(result, *words)
    assert not (tmp_path / "x").exists()


def test_eval_user_errors(runs: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    assert_user_error(invoke("eval", tmp_path / "none", "--data-dir", data_dir), "does not exist")
    assert_user_error(
        invoke("eval", runs["a"], "--data-dir", data_dir, "--tasks", "0,1;1,2"), "overlap"
    )
    assert_user_error(invoke("eval", runs["a"], "--data-dir", tmp_path / "gone"), "not found")


def test_spec_list_names_every_architecture() -> None:
    result = invoke("spec", "--list")
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == names()
    assert {"mlp", "resnet20", "vgg11"} <= set(names())


@pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason=f"real Fashion-MNIST not installed at {FASHION_DIR} (apt-get install "
    "dataset-fashion-mnist)",
)
def test_real_fashion_mnist_one_epoch(tmp_path: Path) -> None:
    out = tmp_path / "real"
    result = invoke("train", "-o", out, "--data-dir", FASHION_DIR, "--task", "5,6,7,8,9",
                    "--arch", "mlp", "--arch-args", '{"hidden": 64}', "--embed-dim", "32",
                    "--epochs", "1", "--batch-size", "256", "--lr", "0.05",
                    "--warmup-epochs", "0.2", "--no-augment")  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluated = invoke("eval", out, "--data-dir", FASHION_DIR, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    row = json.loads(evaluated.stdout)
    assert row["n_images"] == 5000
    assert row["avg"] > 0.7  # about 0.87 after one epoch; chance is 0.2


def test_version_needs_no_command() -> None:
    from mudsc import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"mudsc {__version__}"


def wide_help(command: str) -> str:
    """``mudsc COMMAND --help`` on a terminal wide enough that no help text wraps."""
    env = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}
    return CliRunner().invoke(app, [command, "--help"], env=env).stdout.replace("│", " ")


def test_train_options_are_the_train_config_fields() -> None:
    """Every TrainConfig field is an option named after it, with the field's help text."""
    text = flat(wide_help("train"))
    for field in dataclasses.fields(TrainConfig):
        option = "--" + field.name.replace("_", "-")
        assert flat(option) in text and flat(field.metadata["help"]) in text, field.name
    assert flat("--augment--no-augment") in text


def test_merge_method_help_lists_the_registry() -> None:
    text = flat(wide_help("merge"))
    for name, method in METHODS.items():
        assert flat(f"{name}: {method.description} ({method.reference})") in text


def test_config_options_pass_the_fields_as_one_dict() -> None:
    """Defaults, a bool switch, a type override, metadata help and the generic fallback."""

    @dataclasses.dataclass(frozen=True)
    class Knobs:
        size: int = dataclasses.field(default=3, metadata={"help": "How many knobs."})
        share: float | str = 0.5
        loud: bool = True

    seen: list[dict[str, Any]] = []

    @config_options(Knobs, into="knobs", types={"share": str})
    def command(name: str = typer.Option("x"), *, knobs: dict[str, Any]) -> None:
        seen.append({"name": name, **knobs})

    knobs_app = typer.Typer()
    knobs_app.command()(command)
    knobs_app.command("other")(lambda: None)  # two commands: typer needs the command name
    runner = CliRunner()
    assert runner.invoke(knobs_app, ["command"]).exit_code == 0
    changed = ["command", "--size", "5", "--share", "auto", "--no-loud"]
    assert runner.invoke(knobs_app, changed).exit_code == 0
    assert seen == [
        {"name": "x", "size": 3, "share": "0.5", "loud": True},
        {"name": "x", "size": 5, "share": "auto", "loud": False},
    ]
    help_text = flat(runner.invoke(knobs_app, ["command", "--help"]).stdout)
    assert flat("How many knobs.") in help_text and "Knobs.share" in help_text
