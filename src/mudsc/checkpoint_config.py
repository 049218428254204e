"""The checks on a checkpoint's ``config.json``, done right after it is parsed.

The file is plain JSON a user can edit by hand (or a stranger can hand over), and every
field of it steers what is built next: ``arch_args`` sizes the model, ``partial.n_models``
the number of heads, ``head`` the class table.  Each field is checked here for its type
(and, for the architecture, against the factory's own signature), so a wrong one is one
:class:`CheckpointError` naming it, before a byte of weights is allocated; the size of
the model itself is checked by :func:`mudsc.models.create` on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mudsc.errors import CheckpointError, ConfigError
from mudsc.models.registry import check_args, given, names, shown
from mudsc.partial import check_record

HEAD_KINDS = ("orthonormal", "file", "tensor")
Fail = Callable[[str, str, Any], CheckpointError]


def check_checkpoint_config(config: Any, path: str | Path) -> dict[str, Any]:
    """``config`` (the parsed ``config.json`` at ``path``) as a dict, once every field that
    mudsc reads is of the right type; else one CheckpointError naming the field."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path} must hold a JSON object, got {given(config)}")
    fail = _failer(path)
    arch = config.get("arch")
    if not isinstance(arch, str) or not arch:
        raise fail("arch", "an architecture name", arch)
    if arch not in names():
        raise CheckpointError(
            f"{path}: field 'arch' names architecture {shown(arch)}, which this mudsc does not "
            f"have; known: {', '.join(names())}"
        )
    arch_args = config.get("arch_args", {})
    if not isinstance(arch_args, Mapping):
        raise fail("arch_args", "a mapping of argument names to values", arch_args)
    try:
        check_args(arch, arch_args)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: field 'arch_args': {exc}") from None
    _check_tasks(config.get("tasks", []), fail)
    dataset = config.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise fail("dataset", "a dataset name or null", dataset)
    if config.get("head") is not None:
        _check_head(config["head"], fail)
    if "partial" in config:
        try:
            check_record(config["partial"])
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: field 'partial': {exc}") from None
    return dict(config)


def _failer(path: str | Path) -> Fail:
    def fail(key: str, must: str, value: Any) -> CheckpointError:
        return CheckpointError(f"{path}: field {key!r} must be {must}, got {given(value)}")

    return fail


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tasks(tasks: Any, fail: Fail) -> None:
    """A list of class lists: one per source task, each of class ids >= 0."""
    if not isinstance(tasks, list):
        raise fail("tasks", "a list of lists of class ids", tasks)
    for i, task in enumerate(tasks):
        if not isinstance(task, list) or not all(_is_index(c) for c in task):
            raise fail(f"tasks[{i}]", "a list of class ids (integers >= 0)", task)


def _check_head(head: Any, fail: Fail) -> None:
    """The class-embedding head's description: its kind and integer sizes."""
    if not isinstance(head, Mapping) or head.get("kind") not in HEAD_KINDS:
        raise fail("head", f"a mapping with kind {' / '.join(HEAD_KINDS)}", head)
    for key in ("num_classes", "dim", "seed"):
        value = head.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise fail(f"head.{key}", "an integer >= 0", value)
    if head["kind"] == "file" and not isinstance(head.get("path"), str):
        raise fail("head.path", "the class-embedding file's path", head.get("path"))
