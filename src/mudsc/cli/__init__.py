"""The ``mudsc`` command line: thin commands that parse options, call the library and print.

``mudsc.cli.app`` is the console script's entry point (``mudsc = "mudsc.cli:app"``).
"""

from mudsc.cli.main import app

__all__ = ["app"]
