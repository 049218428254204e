"""Suite-wide test settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """The tests run tiny models, which gain nothing from two intra-op threads; on a shared,
    busy 2-core machine two threads spin-wait on each other (measured: one Fashion-MNIST
    MLP epoch 88 s with two threads vs 6 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
