"""Issue 12, outputs: --force replaces only mudsc's own, one writer per output, killed runs
leave nothing that is not cleaned, full or read-only disks are one line, checkpoints are
hashed, and a resume redoes only what is damaged."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import invoke
from matplotlib.figure import Figure

import mudsc.atomic as atomic
import mudsc.checkpoint as ckpt
from mudsc.atomic import (
    atomic_directory,
    atomic_write_text,
    is_mudsc_output,
    refuse_existing,
    remove_leftovers,
    remove_leftovers_below,
)
from mudsc.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint
from mudsc.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    MudscError,
    ResourceError,
)
from mudsc.experiments import runner
from mudsc.experiments.config import parse_config
from mudsc.experiments.pool import SourceJob
from mudsc.experiments.records import claim_folder, make_key, write_marker
from mudsc.locks import lock_path, output_lock
from mudsc.models import create
from mudsc.plots.style import save_figure, save_json, save_npz
from mudsc.progress import quiet
from mudsc.signals import deferred_interrupts, sigterm_as_keyboard_interrupt

SRC = Path(__file__).resolve().parents[1] / "src"
MLP = {"in_channels": 1, "image_size": 8, "embed_dim": 8, "hidden": 16, "depth": 2}


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create("mlp", **MLP)


def snapshot(root: Path) -> dict[str, Any]:
    """Every path below ``root`` with its bytes (files) and modification time."""
    seen: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        info = path.stat()
        seen[str(path)] = (path.read_bytes() if path.is_file() else None, info.st_mtime_ns)
    return seen


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


# --- --force replaces only what mudsc wrote ----------------------------------------------


def test_force_never_replaces_a_foreign_folder(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("x")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="mudsc did not write it") as exc:
        refuse_existing(proj, force=True)
    assert str(proj) in one_line(exc)
    with pytest.raises(ConfigError, match="mudsc did not write it"):
        save_checkpoint(proj, tiny(), {}, force=True)
    result = invoke("merge", tmp_path / "a", tmp_path / "b", "-o", proj, "--force")
    assert result.exit_code == 2 and "mudsc did not write it" in " ".join(result.stderr.split())
    assert snapshot(tmp_path) == before


def test_force_replaces_mudsc_checkpoints_and_hf_and_experiment_folders(tmp_path: Path) -> None:
    run = save_checkpoint(tmp_path / "run", tiny(0), {})
    refuse_existing(run, force=True)
    save_checkpoint(run, tiny(1), {}, force=True)
    assert same_weights(load_checkpoint(run).model, tiny(1))
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no .old copy, no lock file

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="mudsc did not write it"):
        refuse_existing(hf, force=True)  # somebody's Hugging Face model
    (hf / "mudsc_merge.json").write_text(json.dumps({"method": "avg"}))
    refuse_existing(hf, force=True)  # one mudsc merged

    experiment = tmp_path / "exp"
    (experiment / "pairs").mkdir(parents=True)
    with pytest.raises(ConfigError, match="mudsc did not write it"):
        refuse_existing(experiment, force=True)
    write_marker(experiment, "exp", make_key({"name": "exp"}))
    refuse_existing(experiment, force=True)
    (experiment / "pairs" / "notes.txt").write_text("inside an experiment: mudsc's")
    assert is_mudsc_output(experiment / "pairs" / "notes.txt")

    empty = tmp_path / "empty"
    empty.mkdir()
    refuse_existing(empty, force=True)  # nothing to lose
    with pytest.raises(ConfigError, match="already exists.*--force"):
        refuse_existing(empty, force=False)


def test_force_replaces_only_marked_figures_and_data_files(tmp_path: Path) -> None:
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1])
    png = save_figure(fig, tmp_path / "f.png")
    npz = save_npz(tmp_path / "f.npz", {"a": np.arange(3)})
    data = save_json(tmp_path / "f.json", {"t": [0.0, 1.0]})
    assert np.load(npz)["a"].tolist() == [0, 1, 2]  # the mark is invisible to readers
    for path in (png, npz, data):
        assert is_mudsc_output(path), path
        refuse_existing(path, force=True)
    save_figure(fig, png, force=True)  # a rerun with --force

    fig.savefig(tmp_path / "mine.png")  # a PNG mudsc did not write
    np.savez(tmp_path / "mine.npz", a=np.arange(3))
    (tmp_path / "mine.json").write_text("{}")
    (tmp_path / "alone.json").write_text("{}")
    for name in ("mine.png", "mine.npz", "mine.json", "alone.json"):
        with pytest.raises(ConfigError, match="mudsc did not write it"):
            refuse_existing(tmp_path / name, force=True)
    with pytest.raises(ConfigError, match="already exists"):
        save_figure(fig, png, force=False)


@pytest.mark.parametrize("name", [".", "..", ""])
def test_the_current_or_parent_folder_is_no_output(name: str) -> None:
    with pytest.raises(ConfigError, match="names an existing folder itself"):
        refuse_existing(name, force=True)


def test_a_symlink_is_never_replaced(tmp_path: Path) -> None:
    target = save_checkpoint(tmp_path / "run", tiny(), {})
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ConfigError, match="mudsc did not write it"):
        refuse_existing(tmp_path / "link", force=True)


# --- the experiment folder ---------------------------------------------------------------

MICRO = {"dataset": "embedded", "arch": "mlp", "arch_args": {"hidden": 8, "depth": 1},
         "embed_dim": 16, "pairs": 1, "train": {"epochs": 1},
         "calibration": {"size": 40, "batch_size": 20}}  # fmt: skip


def test_a_refused_experiment_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = parse_config({**MICRO, "output_dir": str(out)}, name="micro")
    write_marker(out, "micro", make_key({"name": "another experiment"}))
    (out / "config.yaml").write_text("the other experiment's config\n")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="different configuration.*--force") as exc:
        runner.run_experiment(cfg)
    one_line(exc)
    assert snapshot(tmp_path) == before

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / ".bashrc").write_text("x")
    (foreign / f".x.mudsc-{dead_pid()}-ab.partial").write_text("not below an experiment")
    before = snapshot(tmp_path)
    cfg = parse_config({**MICRO, "output_dir": str(foreign)}, name="micro")
    with pytest.raises(ConfigError, match="not a mudsc experiment folder"):
        runner.run_experiment(cfg, force=True)
    assert snapshot(tmp_path) == before


def test_an_experiment_claims_its_own_folder_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = parse_config({**MICRO, "output_dir": str(out)}, name="micro")
    key = runner.folder_key(cfg)
    claim_folder(out, key, force=False)  # absent
    write_marker(out, cfg.name, key)
    claim_folder(out, key, force=False)  # its own
    more = parse_config({**MICRO, "methods": ["avg"], "output_dir": str(tmp_path / "x")}, "micro")
    assert runner.folder_key(more) == key  # another method list or place: same experiment
    other = runner.folder_key(parse_config({**MICRO, "embed_dim": 32}, name="micro"))
    with pytest.raises(ConfigError, match=r"differs in: embed_dim"):
        claim_folder(out, other, force=False)
    claim_folder(out, other, force=True)


def test_a_second_run_on_a_locked_folder_is_refused_and_deletes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = parse_config({**MICRO, "output_dir": str(out)}, name="micro")
    out.mkdir()
    write_marker(out, cfg.name, runner.folder_key(cfg))
    working = out / f".model-0.mudsc-{os.getpid()}-ab.partial"  # the first run's temporary
    working.mkdir()
    with output_lock(out):
        with pytest.raises(ResourceError, match=f"another mudsc run is writing {out}"):
            runner.run_experiment(cfg)
    assert working.is_dir()


# --- leftovers of killed runs ------------------------------------------------------------


def test_only_dead_runs_temporaries_are_cleaned(tmp_path: Path) -> None:
    dead = dead_pid()
    (tmp_path / "sub").mkdir()
    killed = tmp_path / f".run.mudsc-{dead}-x1.partial"
    killed.mkdir()
    (killed / MODEL_FILE).write_bytes(b"half")
    killed_file = tmp_path / "sub" / f".r.json.mudsc-{dead}-y2.partial"
    killed_file.write_text("{")
    live = tmp_path / f".run.mudsc-{os.getpid()}-z3.partial"
    live.mkdir()
    other = tmp_path / f".other.mudsc-{dead}-w4.partial"
    other.write_text("")
    users = tmp_path / ".run.x1y2.partial"  # not a name mudsc makes
    users.write_text("")
    stale = lock_path(tmp_path / "sub" / "gone")
    stale.write_text("")

    assert remove_leftovers(tmp_path / "run") == [killed]  # only that output's
    assert other.exists() and live.exists()
    removed = remove_leftovers_below(tmp_path)
    assert sorted(removed) == sorted([other, killed_file, stale])
    assert live.exists() and users.exists()
    save_checkpoint(tmp_path / "run", tiny(), {})
    assert live.exists()  # a live run's temporary survives another write of its output


def test_lock_files_are_not_left_behind_and_a_held_lock_stays(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with output_lock(target):
        assert lock_path(target).exists()
        assert remove_leftovers_below(tmp_path) == []  # held: not stale
    assert os.listdir(tmp_path) == []


# --- full or read-only locations ---------------------------------------------------------


def test_a_full_disk_during_the_save_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = save_checkpoint(tmp_path / "run", tiny(0), {})

    def full(tensors: Any, file: Path) -> str:
        file.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))

    monkeypatch.setattr(ckpt, "write_safetensors", full)
    with pytest.raises(ResourceError, match="No space left on device.*unchanged") as exc:
        save_checkpoint(run, tiny(1), {}, force=True)
    assert str(run) in one_line(exc)
    monkeypatch.undo()
    assert same_weights(load_checkpoint(run).model, tiny(0))
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_full_or_read_only_location_is_found_before_the_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_existing(tmp_path / "deep" / "new", force=False)  # probes the nearest folder
    assert os.listdir(tmp_path) == []

    class Full:
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(atomic.os, "statvfs", lambda path: Full())
    with pytest.raises(ResourceError, match="is full"):
        refuse_existing(tmp_path / "out", force=False)
    monkeypatch.undo()

    def read_only(fd: int, data: bytes) -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(atomic.os, "write", read_only)
    with pytest.raises(ResourceError, match="is read-only") as exc:
        refuse_existing(tmp_path / "out", force=False)
    one_line(exc)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


# --- one writer per output ---------------------------------------------------------------


def test_two_writers_of_one_output_never_replace_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "run"
    inside, loser_done = threading.Event(), threading.Event()
    real = ckpt.write_safetensors
    outcomes: dict[str, Any] = {}

    def slow(tensors: Any, file: Path) -> str:
        if threading.current_thread().name == "first":
            inside.set()
            loser_done.wait(30)
        return real(tensors, file)

    def save(name: str, seed: int) -> None:
        try:
            save_checkpoint(target, tiny(seed), {"writer": name})
            outcomes[name] = "saved"
        except MudscError as exc:
            outcomes[name] = exc
        finally:
            if name == "second":
                loser_done.set()

    monkeypatch.setattr(ckpt, "write_safetensors", slow)
    first = threading.Thread(target=save, args=("first", 0), name="first")
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=save, args=("second", 1), name="second")
    second.start()
    second.join(30)
    first.join(30)
    assert outcomes["first"] == "saved"
    assert isinstance(outcomes["second"], ResourceError)
    assert f"another mudsc run is writing {target}" in str(outcomes["second"])
    # a writer that checked before the first one finished still never replaces it
    with pytest.raises(ConfigError, match="already exists"):
        save_checkpoint(target, tiny(2), {"writer": "late"})
    assert load_checkpoint(target).config["writer"] == "first"
    assert sorted(os.listdir(tmp_path)) == ["run"]


# --- SIGTERM -----------------------------------------------------------------------------

SLOW_SAVE = """
import sys, time
import mudsc.checkpoint as ckpt
from mudsc.models import create
from mudsc.signals import sigterm_as_keyboard_interrupt

assert sigterm_as_keyboard_interrupt()
real = ckpt.write_safetensors

def slow(tensors, file):
    digest = real(tensors, file)
    print("writing", flush=True)
    time.sleep(60)
    return digest

ckpt.write_safetensors = slow
model = create("mlp", in_channels=1, image_size=8, embed_dim=8, hidden=16, depth=2)
ckpt.save_checkpoint(sys.argv[1], model, {}, force=True)
"""


def test_sigterm_during_a_save_leaves_the_old_output_and_no_temporaries(tmp_path: Path) -> None:
    run = save_checkpoint(tmp_path / "run", tiny(0), {})
    script = tmp_path.parent / f"{tmp_path.name}-slow_save.py"
    script.write_text(textwrap.dedent(SLOW_SAVE))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    child = subprocess.Popen([sys.executable, str(script), str(run)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
        assert any(".partial" in name for name in os.listdir(tmp_path))
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert same_weights(load_checkpoint(run).model, tiny(0))


def test_interrupts_wait_for_the_rename_and_threads_install_nothing() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert sigterm_as_keyboard_interrupt()
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("end of block")
        assert reached == ["end of block"]
    finally:
        signal.signal(signal.SIGTERM, previous)
    installed = []
    thread = threading.Thread(target=lambda: installed.append(sigterm_as_keyboard_interrupt()))
    thread.start()
    thread.join()
    assert installed == [False]


def test_weights_and_config_get_the_same_mode(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        run = save_checkpoint(tmp_path / "run", tiny(), {})
        atomic_write_text(tmp_path / "notes.txt", "x")
    finally:
        os.umask(umask)
    modes = {
        p.name: p.stat().st_mode & 0o777 for p in [*run.iterdir(), run, tmp_path / "notes.txt"]
    }
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644, "run": 0o755,
                     "notes.txt": 0o644}  # fmt: skip


def test_a_failing_writer_leaves_no_temporaries(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        (tmp / "a").write_text("x")
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(ResourceError, match="I/O error"):
        atomic_directory(tmp_path / "d", force=False, write=write)
    assert os.listdir(tmp_path) == []


# --- checkpoint hashes and load errors ---------------------------------------------------


def test_a_flipped_bit_in_the_weights_is_reported(tmp_path: Path) -> None:
    run = save_checkpoint(tmp_path / "run", tiny(), {})
    file = run / MODEL_FILE
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes: still a valid safetensors file
    file.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors is damaged") as exc:
        load_checkpoint(run)
    one_line(exc)
    config = json.loads((run / "config.json").read_text())
    del config["sha256"]  # an older checkpoint, without digests, still loads
    (run / "config.json").write_text(json.dumps(config))
    load_checkpoint(run)


def test_truncated_files_are_corrupt_and_other_problems_are_not(tmp_path: Path) -> None:
    run = save_checkpoint(tmp_path / "run", tiny(), {})
    file = run / MODEL_FILE
    good = file.read_bytes()
    file.write_bytes(good[:100])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        load_checkpoint(run)
    file.unlink()
    os.mkfifo(file)  # reading would block forever
    with pytest.raises(CheckpointError, match="not a regular file") as exc:
        load_checkpoint(run)
    assert not isinstance(exc.value, CorruptCheckpointError)
    file.unlink()
    file.write_bytes(good)
    with pytest.raises(CheckpointError, match="does not exist") as exc:
        load_checkpoint(tmp_path / "nowhere")
    assert not isinstance(exc.value, CorruptCheckpointError)


def _drop(state: dict) -> None:
    del state["features.2.bias"]


def _extra(state: dict) -> None:
    state["extra.weight"] = torch.zeros(2)


def _wider(state: dict) -> None:
    state["features.2.weight"] = torch.zeros(16, 32)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop, r"tensor 'features.2.bias' is missing"),
        (_extra, r"tensor 'extra.weight' is not part of the architecture"),
        (_wider, r"'features.2.weight' has shape \(16, 32\), the architecture needs \(16, 16\)"),
    ],
)
def test_weights_that_do_not_fit_name_the_first_bad_key(
    tmp_path: Path, edit: Any, message: str
) -> None:
    state = tiny().state_dict()
    edit(state)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=message) as exc:
        load_checkpoint(tmp_path / "w.pt", arch="mlp", arch_args=MLP)
    assert not isinstance(exc.value, CorruptCheckpointError)
    one_line(exc)


# --- resume ------------------------------------------------------------------------------


def test_resume_redoes_a_damaged_source_and_stops_at_an_incompatible_one(
    tmp_path: Path,
) -> None:
    run = save_checkpoint(tmp_path / "run", tiny(0), {"experiment_key": {"k": 1}})
    made: list[str] = []
    job = SourceJob(run, {"k": 1}, "source",
                    lambda where: (load_checkpoint(where).config["experiment_key"], "loaded"),
                    lambda: made.append("made") or "made")  # fmt: skip
    assert runner.ensure_source(job, False, quiet) == ("loaded", True)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "arch_args": {**MLP, "hidden": 32}}))
    with pytest.raises(CheckpointError, match="do not fit architecture"):
        runner.ensure_source(job, False, quiet)
    assert made == []  # never trained over
    (run / "config.json").write_text(json.dumps(config))
    (run / MODEL_FILE).write_bytes((run / MODEL_FILE).read_bytes()[:50])
    assert runner.ensure_source(job, False, quiet) == ("made", False)
    assert made == ["made"]
