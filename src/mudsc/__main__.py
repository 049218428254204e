"""``python -m mudsc`` runs the command line."""

from mudsc.cli import app

app()
