"""The exceptions for user-facing failures, one small hierarchy under :class:`MudscError`.

The CLI prints any of them as one line with a non-zero exit; the subclasses let callers
react to one kind only (the experiment resume redoes a unit on ``CorruptCheckpointError``
and on nothing else, so an incompatible checkpoint is reported, never retrained over).
"""


class MudscError(Exception):
    """A problem with the user's input: the message names the problem and the fix."""


class ConfigError(MudscError):
    """An option, a config file or an argument is invalid (wrong type, range or value)."""


class DataError(MudscError):
    """A dataset, calibration or evaluation file is missing, malformed or does not fit."""


class SpecError(MudscError):
    """A model cannot be traced, or a merge spec does not describe the model."""


class ResourceError(MudscError):
    """The machine cannot do it: disk full, read-only output, a lock held, too much memory."""


class CheckpointError(MudscError):
    """A checkpoint cannot be used: missing, of another architecture, or not mudsc's."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's bytes are damaged (truncated, unparsable, or its hash differs)."""
