"""Train/eval mode switches that always restore every submodule's own mode.

``model.eval()`` followed by ``model.train(was_training)`` flattens a model whose
submodules were in different modes (a frozen BatchNorm inside a training model); this
context manager records and restores each submodule's flag instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from torch import nn


@contextmanager
def module_mode(*models: nn.Module, training: bool) -> Iterator[None]:
    """Put every module of ``models`` in train (``training=True``) or eval mode for the
    block, then give each submodule back its own mode, also on error."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.train(training)
        yield
    finally:
        for module, mode in saved:
            module.training = mode


def eval_mode(*models: nn.Module) -> AbstractContextManager[None]:
    """``with eval_mode(a, b): ...``: inference mode for the block, modes restored after."""
    return module_mode(*models, training=False)


def train_mode(*models: nn.Module) -> AbstractContextManager[None]:
    """``with train_mode(m): ...``: training mode for the block, modes restored after."""
    return module_mode(*models, training=True)
