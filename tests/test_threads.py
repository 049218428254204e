"""The thread policy: env overrides, the affinity bound, idempotence, the wait setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mudsc.errors import ConfigError
from mudsc.threads import (
    SHORT_WAIT,
    configure_threads,
    prepare_environment,
    thread_count,
    usable_cores,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_is_the_affinity_count_never_more():
    assert thread_count({}) == usable_cores() == len(os.sched_getaffinity(0))
    assert usable_cores() <= (os.cpu_count() or 1)


def test_affinity_not_cpu_count(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert thread_count({}) == 1


def test_env_overrides_mudsc_first():
    assert thread_count({"OMP_NUM_THREADS": "3"}) == 3
    assert thread_count({"OMP_NUM_THREADS": "3,1"}) == 3
    assert thread_count({"MUDSC_THREADS": "1", "OMP_NUM_THREADS": "3"}) == 1
    assert thread_count({"MUDSC_THREADS": " ", "OMP_NUM_THREADS": "2"}) == 2


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_bad_env_value_is_a_config_error(value):
    with pytest.raises(ConfigError, match="MUDSC_THREADS"):
        thread_count({"MUDSC_THREADS": value})


def test_configure_sets_torch_and_is_idempotent(restore_threads):
    assert configure_threads({"MUDSC_THREADS": "1"}) == 1
    assert torch.get_num_threads() == 1
    assert configure_threads({"MUDSC_THREADS": "1"}) == 1
    assert torch.get_num_threads() == 1
    assert configure_threads({}) == usable_cores() == torch.get_num_threads()


def test_prepare_environment_keeps_user_choices_and_is_idempotent():
    env = {"GOMP_SPINCOUNT": "5"}
    assert prepare_environment(env)
    assert env == {"GOMP_SPINCOUNT": "5", "KMP_BLOCKTIME": SHORT_WAIT["KMP_BLOCKTIME"]}
    once = dict(env)
    prepare_environment(env)
    assert env == once
    chosen = {"OMP_WAIT_POLICY": "PASSIVE"}
    prepare_environment(chosen)
    assert chosen == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_prepare_environment_before_torch_makes_its_openmp_passive():
    """In a fresh interpreter, calling it before ``import torch`` reaches the runtime."""
    code = (
        "import os; from mudsc.threads import prepare_environment;"
        "ok = prepare_environment(); import torch;"
        "print(ok, os.environ['GOMP_SPINCOUNT'], prepare_environment())"
    )
    env = {k: v for k, v in os.environ.items() if k not in (*SHORT_WAIT, "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = SRC
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["True", SHORT_WAIT["GOMP_SPINCOUNT"], "False"]


def test_a_bad_thread_count_is_one_cli_line(monkeypatch) -> None:
    from cli_helpers import invoke

    monkeypatch.setenv("MUDSC_THREADS", "abc")
    result = invoke("spec", "--list")
    assert result.exit_code == 2
    assert "MUDSC_THREADS='abc' is not a whole number" in result.output
    assert "Traceback" not in result.output
