"""Command-line options derived from a config dataclass, so names and defaults live once.

Each field of the dataclass becomes one typer option: ``--field-name``, the field's type
and default, and the help text in ``field(metadata={"help": ...})``.  A bool field becomes
a ``--name/--no-name`` switch, except one already named ``no_...``: it is the single flag
``--no-...`` (never a ``--no-no-...`` twin).  The command receives the values as one dict and builds
the config itself, so it decides when validation errors surface.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import typer

try:  # typer >= 0.26 carries its own copy of click
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context
except ImportError:  # older typer runs on click itself
    from click import get_current_context  # type: ignore[no-redef]
    from click.core import ParameterSource  # type: ignore[no-redef]

F = TypeVar("F", bound=Callable[..., Any])


def field_help(config: type, field: dataclasses.Field) -> str:
    """The field's own help text; a pointer to the dataclass where it has none."""
    return field.metadata.get("help") or f"{config.__name__}.{field.name}"


# Inclusive (min, max) of a numeric option; None leaves that side open.
Range = tuple[float | None, float | None]


def _flag_names(name: str, annotation: Any) -> tuple[str, ...]:
    """Explicit option names for a bool field called ``no_...``; typer's default otherwise."""
    if annotation is bool and name.startswith("no_"):
        return ("--" + name.replace("_", "-"),)
    return ()


def field_parameters(
    config: type,
    skip: Collection[str] = (),
    types: Mapping[str, type] | None = None,
    helps: Mapping[str, str] | None = None,
    panel: str | None = None,
    ranges: Mapping[str, Range] | None = None,
) -> list[inspect.Parameter]:
    """One keyword-only typer parameter per field of ``config`` (except ``skip``).

    ``types`` overrides a field's type where typer cannot parse it (``float | str``);
    ``helps`` overrides a help text that is computed at run time (e.g. from a registry);
    ``ranges`` bounds a numeric field, so a bad value is refused while parsing.
    """
    hints = typing.get_type_hints(config)
    params = []
    for field in dataclasses.fields(config):
        if field.name in skip:
            continue
        if field.default is dataclasses.MISSING:
            raise TypeError(f"{config.__name__}.{field.name} needs a default to be an option")
        annotation = (types or {}).get(field.name, hints[field.name])
        low, high = (ranges or {}).get(field.name, (None, None))
        option = typer.Option(
            field.default,
            *_flag_names(field.name, annotation),
            help=(helps or {}).get(field.name) or field_help(config, field),
            rich_help_panel=panel,
            min=low,
            max=high,
        )
        params.append(
            inspect.Parameter(
                field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
            )
        )
    return params


def config_options(
    config: type,
    into: str,
    skip: Collection[str] = (),
    types: Mapping[str, type] | None = None,
    helps: Mapping[str, str] | None = None,
    panel: str | None = None,
    ranges: Mapping[str, Range] | None = None,
) -> Callable[[F], F]:
    """Decorator: add ``config``'s fields as options; the command gets them as ``into``.

    The command declares ``into`` as a keyword-only parameter (a dict of field values);
    typer sees the fields instead, listed after the command's own options.
    """
    extra = field_parameters(config, skip, types, helps, panel, ranges)
    names = [p.name for p in extra]

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != into]
        clash = set(names) & {p.name for p in own}
        if clash:
            raise TypeError(f"{command.__name__} already has parameters {sorted(clash)}")

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, **{into: values})

        wrapper.__signature__ = signature.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``values`` that the user gave (command line or environment), not
    their defaults: what overrides a preset.  Call it inside the running command."""
    context = get_current_context()
    chosen = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {k: v for k, v in values.items() if context.get_parameter_source(k) in chosen}
