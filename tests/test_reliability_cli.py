"""Issue 12, CLI side: every user mistake is one line and exit 2 with no file touched; an
escaped OSError is one line; every --help ends with examples that parse; --json prints
only JSON on stdout; no --no-no-X options."""

from __future__ import annotations

import errno
import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from cli_helpers import flat
from typer.testing import CliRunner, Result

from mudsc.checkpoint import save_checkpoint
from mudsc.cli import app
from mudsc.cli.common import friendly, resolve_device
from mudsc.cli.examples import EXAMPLES
from mudsc.data import DATASETS
from mudsc.errors import ConfigError
from mudsc.methods import METHODS
from mudsc.models import create, names
from mudsc.models.head import ClassEmbeddingHead

REPO = Path(__file__).resolve().parents[1]
COMMAND: Any = typer.main.get_command(app)
TASKS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
SMALL = ["--calibration-size", "32", "--batch-size", "32"]


def _run(args: list[str]) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with two empty sources, a symlink loop, a FIFO and a link to
    itself."""
    work = tmp_path / "work"
    (work / "src" / "a").mkdir(parents=True)
    (work / "src" / "b").mkdir()
    os.symlink("loop2", work / "loop1")
    os.symlink("loop1", work / "loop2")
    os.mkfifo(work / "fifo")
    os.symlink(".", work / "here")
    (work / "cfg.yaml").write_text("name: x\n")
    monkeypatch.chdir(work)
    return work


A, B = "src/a", "src/b"
# argv, expected exit code, a fragment of the one-line message (whitespace ignored)
BAD = [
    (["merge", A, B, "-o", "."], 2, "is the current directory"),
    (["merge", A, B, "-o", ""], 2, "is the current directory"),
    (["merge", A, B, "-o", ".."], 2, "one of its parents"),
    (["merge", A, B, "-o", "src"], 2, "holds the input"),
    (["merge", A, B, "-o", "here", "--force"], 2, "is the current directory"),
    (["merge", A, B, "-o", A, "--force"], 2, "holds the input"),
    (["train", "-o", "."], 2, "is the current directory"),
    (["train", "-o", ".."], 2, "one of its parents"),
    (["landscape", A, B, "-o", "."], 2, "is the current directory"),
    (["interpolate", A, B, "-o", ".."], 2, "one of its parents"),
    (["experiment", "cfg.yaml", "-o", "."], 2, "is the current directory"),
    (["merge", A, B, "-o", "m", "--batch-size", "0"], 2, "--batch-size"),
    (["merge", A, B, "-o", "m", "--batch-size", "-5"], 2, "--batch-size"),
    (["merge", A, B, "-o", "m", "--calibration-size", "0"], 2, "--calibration-size"),
    (["merge", A, B, "-o", "m", "--max-sweeps", "0"], 2, "--max-sweeps"),
    (["train", "-o", "t", "--batch-size", "0"], 2, "--batch-size"),
    (["train", "-o", "t", "--epochs", "-1"], 2, "--epochs"),
    (["train", "-o", "t", "--width", "0"], 2, "--width must be positive"),
    (["train", "-o", "t", "--lr", "0"], 2, "lr=0"),
    (["merge", A, B, "-o", "m", "--holdout", "2"], 2, "holdout"),
    (["eval", A, "--batch-size", "0"], 2, "--batch-size"),
    (["landscape", A, B, "--batch-size", "0"], 2, "--batch-size"),
    (["spec", "--arch", "mlp", "--image-size", "100000"], 2, "1024"),
    (["merge", A, B, "-o", "m", "--device", "meta"], 2, "unknown device 'meta'"),
    (["merge", A, B, "-o", "m", "--device", "xla"], 2, "unknown device 'xla'"),
    (["train", "-o", "t", "--device", "nonsense"], 2, "unknown device"),
    (["eval", A, "--device", "cuda:x"], 2, "unknown device"),
    (["demo", "--device", "cpu:3"], 2, "one cpu device"),
    (["landscape", A, B, "--resolution", "100000"], 2, "50"),
    (["landscape", A, B, "--resolution", "1"], 2, "--resolution"),
    (["interpolate", A, B, "--steps", "1"], 2, "--steps"),
    (["merge", A, B, "-o", "m", "--zip-a", "-1"], 2, "--zip-a"),
    (["merge", "loop1", B, "-o", "m"], 2, "is a symlink loop"),
    (["merge", "fifo", B, "-o", "m"], 2, "is not a directory"),
    (["merge", A, B, "-o", "m", "--calibration", "fifo"], 2, "not a regular file"),
    (["merge", A, B, "-o", "m", "--calibration", "loop1"], 2, "is a symlink loop"),
    (["eval", "loop1"], 2, "is a symlink loop"),
    (["eval", A, "--data-file", "fifo"], 2, "not a regular file"),
    (["experiment", "fifo"], 2, "not a regular file"),
    (["experiment", "loop1"], 2, "is a symlink loop"),
    (["landscape", "loop1", B], 2, "is a symlink loop"),
    (["spec", "loop1"], 2, "is a symlink loop"),
    (["train", "-o", "t", "--class-embeddings", "fifo"], 2, "not a regular file"),
]


@pytest.mark.parametrize(("argv", "code", "fragment"), BAD, ids=[" ".join(r[0]) for r in BAD])
def test_a_bad_command_line_is_one_line_and_touches_nothing(
    sandbox: Path, argv: list[str], code: int, fragment: str
) -> None:
    before = _tree(sandbox.parent)
    result = _run(argv)
    assert result.exit_code == code, result.output
    assert flat(fragment) in flat(result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert _tree(sandbox.parent) == before
    assert len(result.output.strip().splitlines()) == 1, result.output  # click's errors too


def test_a_symlink_loop_is_not_reported_as_missing(sandbox: Path) -> None:
    result = _run(["eval", "loop1"])
    assert "does not exist" not in result.output and "symlink loop" in result.output


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        (errno.ENOSPC, "No space left on device; free some space"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "check the permissions"),
        (errno.ELOOP, "symlink loops"),
        (errno.ENAMETOOLONG, "use a shorter path"),
    ],
)
def test_an_escaped_os_error_is_one_line_naming_the_file(
    capsys: pytest.CaptureFixture[str], code: int, fragment: str
) -> None:
    @friendly
    def command() -> None:
        raise OSError(code, os.strerror(code), "/out/model.safetensors")

    with pytest.raises(typer.Exit) as exit_info:
        command()
    assert exit_info.value.exit_code == 1
    err = capsys.readouterr().err
    assert "/out/model.safetensors" in err and fragment in err
    assert len(err.strip().splitlines()) == 1


def test_an_os_error_during_a_command_has_no_traceback(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(path: object, force: bool) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("mudsc.atomic.refuse_existing", full)
    result = _run(["merge", A, B, "-o", "merged"])
    assert result.exit_code == 1
    assert flat("merged: No space left on device") in flat(result.output)
    assert "Traceback" not in result.output


def test_a_programming_error_keeps_its_traceback() -> None:
    @friendly
    def command() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        command()


@pytest.mark.parametrize("name", ["meta", "xla", "nonsense", "cuda:-1", "cpu:1", ""])
def test_resolve_device_accepts_only_cpu_cuda_mps(name: str) -> None:
    with pytest.raises(ConfigError):
        resolve_device(name)


def test_resolve_device_accepts_cpu() -> None:
    assert resolve_device("cpu").type == "cpu"


def _example_args(command: str, line: str) -> list[str]:
    words = shlex.split(line)
    assert words[:2] == ["mudsc", command], line
    return words[2:]


def _check_names(args: list[str]) -> None:
    """The names an example uses exist in their registries, so it runs as printed."""
    registries = {"--arch": names(), "--dataset": list(DATASETS), "--data": list(DATASETS),
                  "--method": list(METHODS)}  # fmt: skip
    for flag, value in zip(args, args[1:], strict=False):
        if flag in registries:
            assert value in registries[flag], (flag, value)
        if flag == "--methods":
            assert set(value.split(",")) <= set(METHODS), value
        if value.endswith(".yaml"):
            assert (REPO / value).is_file(), value


@pytest.mark.parametrize("command", sorted(COMMAND.commands))
def test_every_help_ends_with_examples_that_parse(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    lines = EXAMPLES[command]
    assert 1 <= len(lines) <= 2
    help_text = flat(result.stdout)
    assert help_text.rstrip("│").endswith(flat(lines[-1]))
    for line in lines:
        assert flat(line) in help_text
        args = _example_args(command, line)
        _check_names(args)
        with COMMAND.commands[command].make_context(command, list(args)) as ctx:
            assert ctx.params is not None


# Numeric options whose range is checked by the library's config (one line too, see BAD).
CHECKED_ELSEWHERE = {("train", "width"), ("train", "lr"), ("merge", "holdout")}


def test_every_numeric_option_has_a_range() -> None:
    for name, command in COMMAND.commands.items():
        for param in command.params:
            if (
                param.bare_type() in ("int", "float")
                and (name, param.name) not in CHECKED_ELSEWHERE
            ):
                assert (param.min, param.max) != (None, None), (name, param.name)


def test_no_option_is_a_no_no_pair() -> None:
    for name, command in COMMAND.commands.items():
        for param in command.params:
            for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
                assert "no-no-" not in opt, (name, opt)


def test_a_field_named_no_x_is_a_single_flag() -> None:
    from dataclasses import dataclass, field

    from mudsc.cli.options import config_options

    @dataclass
    class Knobs:
        no_augment: bool = field(default=False, metadata={"help": "Skip augmentation."})
        shuffle: bool = True

    knobs_app = typer.Typer(add_completion=False)

    @knobs_app.command()
    @config_options(Knobs, into="knobs")
    def command(*, knobs: dict) -> None:
        print(json.dumps(knobs))

    click_command = typer.main.get_command(knobs_app)
    opts = {o for p in click_command.params for o in [*p.opts, *p.secondary_opts]}
    assert opts == {"--no-augment", "--shuffle", "--no-shuffle"}
    assert json.loads(CliRunner().invoke(knobs_app, ["--no-augment"]).stdout) == {
        "no_augment": True, "shuffle": True,
    }  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny untrained MLP checkpoints on the embedded dataset."""
    root = tmp_path_factory.mktemp("ckpt")
    head = ClassEmbeddingHead.orthonormal(10, 16)
    for seed, task, name in zip((0, 1), TASKS, "ab", strict=True):
        import torch

        torch.manual_seed(seed)
        model = create("mlp", in_channels=1, image_size=28, embed_dim=16, hidden=32).eval()
        save_checkpoint(root / name, model, {"kind": "train", "dataset": "embedded",
                                             "tasks": [task]}, head)  # fmt: skip
    return root / "a", root / "b"


def test_merge_json(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "m"
    result = _run(["merge", *checkpoints, "-o", out, "--method", "zipit", "--json", *SMALL])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["output"] == str(out) and printed["method"] == "zipit"
    assert printed["sources"] == [str(p) for p in checkpoints] and "timings" in printed


def test_landscape_json(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "l.png"
    result = _run(["landscape", *checkpoints, "-o", out, "--methods", "avg", "--resolution",
                   "2", "--data-size", "20", "--json", *SMALL])  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["png"] == str(out) and printed["frame"] == "avg"
    assert {p["method"] for p in printed["points"]} >= {"avg"}


def test_interpolate_json(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "i.png"
    result = _run(["interpolate", *checkpoints, "-o", out, "--method", "avg", "--steps", "2",
                   "--data-size", "20", "--json", *SMALL])  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["t"] == [0.0, 1.0]
    assert printed == {"png": str(out), "data": str(tmp_path / "i.json"),
                       **json.loads((tmp_path / "i.json").read_text())}  # fmt: skip


MICRO = {
    "name": "micro-json", "dataset": "embedded", "arch": "mlp",
    "arch_args": {"hidden": 16, "depth": 1}, "embed_dim": 16, "split": "5+5", "pairs": 1,
    "train": {"epochs": 1, "batch_size": 50, "lr": 0.05, "warmup_epochs": 0.2,
              "augment": False},
    "train_images_per_class": 20, "test_images_per_class": 5, "methods": ["avg"],
    "alpha": 0.5, "calibration": {"size": 40, "batch_size": 40, "holdout": 0.25},
}  # fmt: skip


def test_experiment_json(tmp_path: Path) -> None:
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(MICRO))
    out = tmp_path / "run"
    dry = _run(["experiment", config, "-o", out, "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["valid"] is True
    result = _run(["experiment", config, "-o", out, "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["output_dir"] == str(out)
    assert printed["results"] == json.loads((out / "results.json").read_text())
