"""Helpers shared by the CLI tests: invoking the app and training two small sources."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner, Result

from mudsc.cli import app

TRAIN_ARGS = [
    "--dataset", "fashion-mnist", "--arch", "mlp", "--arch-args", '{"hidden": 32}',
    "--embed-dim", "32", "--epochs", "2", "--batch-size", "64", "--lr", "0.05",
]  # fmt: skip


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Output without whitespace: rich wraps long lines (and paths) at the console width."""
    return "".join(text.split())


def train_sources(data_dir: Path, out: Path) -> dict[str, Path]:
    """Two source checkpoints trained with the CLI: classes 0-4 and 5-9."""
    paths = {}
    for name, task, seed in (("a", "0,1,2,3,4", 0), ("b", "5,6,7,8,9", 1)):
        paths[name] = out / name
        result = invoke("train", "-o", paths[name], "--data-dir", data_dir, "--task", task,
                        "--seed", seed, *TRAIN_ARGS)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert flat(f"saved {paths[name]}") in flat(result.stdout)
    return paths
