"""The ``mudsc`` command line: thin commands that parse options, call the library and print.

``mudsc.cli.app`` is the console script's entry point (``mudsc = "mudsc.cli:app"``).  The
OpenMP wait policy is set here, before anything imports torch: its runtime reads it once,
at load (see :mod:`mudsc.threads`).
"""

from mudsc.threads import prepare_environment

prepare_environment()

from mudsc.cli.main import app  # noqa: E402

__all__ = ["app"]
