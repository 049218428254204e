"""The root ``mudsc`` Typer app: its help text and the options every command shares.

Commands are registered in :mod:`mudsc.cli.main`, not here, so no module adds itself to
the app as a side effect of being imported.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.26 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

from mudsc import __version__
from mudsc.cli.common import console, err_console, print_error
from mudsc.errors import MudscError
from mudsc.signals import sigterm_as_keyboard_interrupt
from mudsc.threads import configure_threads


def _print_version(asked: bool) -> None:
    """Eager ``--version``: answers before click asks for a command."""
    if asked:
        console.print(f"mudsc {__version__}")
        raise typer.Exit()


def options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log library progress."),
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Global options: logging level and the version; SIGTERM unwinds like Ctrl-C; torch
    uses the cores this process may run on (mudsc.threads)."""
    sigterm_as_keyboard_interrupt()
    try:
        configure_threads()
    except MudscError as exc:
        print_error(str(exc))
        raise typer.Exit(2) from None
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class OneLineUsageErrors(TyperGroup):
    """Click's usage errors (a bad option value, a missing argument) as one line naming the
    problem and where help is, like every other mudsc error, instead of a boxed panel."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click_exceptions.NoArgsIsHelpError as exc:
            console.print(exc.ctx.get_help() if exc.ctx else "")
            if not standalone_mode:
                raise
            sys.exit(exc.exit_code)
        except click_exceptions.ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) else "mudsc"
            print_error(f"{exc.format_message()} (see {where} --help)")
            if not standalone_mode:
                raise
            sys.exit(exc.exit_code)
        except typer.Abort:
            err_console.print("aborted")
            if not standalone_mode:
                raise
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


def create_app() -> typer.Typer:
    """An app with the global options and no commands yet."""
    app = typer.Typer(
        cls=OneLineUsageErrors,
        add_completion=False,
        no_args_is_help=True,
        help="Merge separately trained networks without training (MuDSC and its baselines).",
    )
    app.callback()(options)
    return app
