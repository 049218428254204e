"""The root ``mudsc`` Typer app: its help text and the options every command shares.

Commands are registered in :mod:`mudsc.cli.main`, not here, so no module adds itself to
the app as a side effect of being imported.
"""

from __future__ import annotations

import logging
import sys

import typer

from mudsc import __version__
from mudsc.cli.common import console
from mudsc.signals import sigterm_as_keyboard_interrupt


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
    """Global options: logging level and the version; SIGTERM unwinds like Ctrl-C."""
    sigterm_as_keyboard_interrupt()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def create_app() -> typer.Typer:
    """An app with the global options and no commands yet."""
    app = typer.Typer(
        add_completion=False,
        no_args_is_help=True,
        help="Merge separately trained networks without training (MuDSC and its baselines).",
    )
    app.callback()(options)
    return app
