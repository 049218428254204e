"""Suite-wide test settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_helpers import train_sources
from fixtures_data import write_idx_dataset

from mudsc.data import ENV_VAR


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """The tests run tiny models, which gain nothing from two intra-op threads; on a shared,
    busy 2-core machine two threads spin-wait on each other (measured: one Fashion-MNIST
    MLP epoch 88 s with two threads vs 6 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the user's MUDSC_DATA_DIR out of every test."""
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated Fashion-MNIST-format IDX folder (400 train / 200 test images)."""
    root = tmp_path_factory.mktemp("fashion")
    write_idx_dataset(root, n_train=400, n_test=200)
    return root


@pytest.fixture(scope="module")
def runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two source checkpoints, trained once per module with the CLI: classes 0-4 and 5-9."""
    return train_sources(data_dir, tmp_path_factory.mktemp("runs"))
