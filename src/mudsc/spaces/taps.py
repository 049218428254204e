"""Which taps the activation statistics read (docs/ALGORITHM.md section 2, "Activation tap").

A residual stream is one space read by every consumer in its stage, so it has many taps.
``"all"`` observes the stream at every one of them; ``"last"`` reads it once, where it is
read last in graph order: for a ResNet stage, the input of the next stage's first block
(the stream after the stage's last addition), as the authors of MuDSC and ZipIt! do.
"""

from __future__ import annotations

from dataclasses import replace

from mudsc.errors import ConfigError
from mudsc.spaces.spec import MergeSpec, Space

TAP_RULES = ("all", "last")
"""The values of ``MergeConfig.taps``."""


def last_read(space: Space) -> Space:
    """``space`` with only the taps of its last read (one module's input or output, in
    graph order).  Several taps at that one place are kept: they are different features
    of one call (an attention layer's q and k slices of its qkv output); taps elsewhere
    that see the same tensor (a block's conv1 and its shortcut) count as earlier reads."""
    if len(space.taps) < 2:
        return space
    last = space.taps[-1]
    place = (last.module, last.side, last.arg)
    return replace(space, taps=tuple(t for t in space.taps if (t.module, t.side, t.arg) == place))


def select_taps(spec: MergeSpec, rule: str) -> MergeSpec:
    """The spec the statistics pass reads under ``rule`` (one of :data:`TAP_RULES`): every
    tap, or each space's last read only.  Members and everything else are unchanged."""
    if rule not in TAP_RULES:
        raise ConfigError(f"unknown taps rule {rule!r}; valid: {', '.join(TAP_RULES)}")
    if rule == "all":
        return spec
    return replace(spec, spaces=tuple(last_read(s) for s in spec.spaces))
