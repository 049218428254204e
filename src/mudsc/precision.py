"""Opt-in reduced precision for the statistics forward passes (``--precision``).

The forward passes dominate a merge's time; on a GPU they run markedly faster in bf16
(autocast) or with TF32 matmuls.  Only the models' forward runs reduced: the features
are handed to the moment accumulators, which leave autocast (:func:`full_precision`) and
add up in float64 as always.  ``fp32`` (the default) enters no context at all, so default
merges stay bit for bit what they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mudsc.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "tf32")


def check_precision(precision: str, device: str) -> None:
    """Refuse an unknown precision, and TF32 off cuda (it would silently change nothing:
    CPUs have no TF32 matmuls)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "tf32" and torch.device(device).type != "cuda":
        raise ConfigError(
            f"precision 'tf32' only changes cuda matmuls, and the merge runs on {device}; "
            "use --precision bf16 (or fp32) there, or --device cuda"
        )


@contextmanager
def forward_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the forward passes inside in ``precision`` on ``device``; flags are restored."""
    dev = torch.device(device)
    if precision == "fp32":
        yield
    elif precision == "bf16":
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32":
        with _tf32():
            yield
    else:
        check_precision(precision, str(dev))


@contextmanager
def _tf32() -> Iterator[None]:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Leave an enclosing autocast (the moment products must not run in bf16); a no-op
    outside one."""
    if not torch.is_autocast_enabled(device.type):
        yield
        return
    with torch.autocast(device_type=device.type, enabled=False):
        yield
