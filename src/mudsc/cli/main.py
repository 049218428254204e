"""The whole ``mudsc`` command line: every command, registered here in help order."""

from __future__ import annotations

import typer

from mudsc.cli.demo import demo_command
from mudsc.cli.evaluate import eval_command
from mudsc.cli.examples import epilog
from mudsc.cli.experiment import experiment_command
from mudsc.cli.figures import diagnose_command, interpolate_command, landscape_command
from mudsc.cli.merge import merge_command
from mudsc.cli.root import create_app
from mudsc.cli.spec import spec_command
from mudsc.cli.train import train_command

COMMANDS = {
    "train": train_command,
    "eval": eval_command,
    "spec": spec_command,
    "demo": demo_command,
    "merge": merge_command,
    "experiment": experiment_command,
    "landscape": landscape_command,
    "diagnose": diagnose_command,
    "interpolate": interpolate_command,
}


def build_app() -> typer.Typer:
    """The root app with every command of :data:`COMMANDS` registered under its name, its
    ``--help`` ending with the examples of :data:`~mudsc.cli.examples.EXAMPLES`."""
    app = create_app()
    for name, command in COMMANDS.items():
        app.command(name, epilog=epilog(name))(command)
    return app


app = build_app()
