"""Merging methods as records of parts (similarity, solver, parameters), found by name."""

from __future__ import annotations

from mudsc.methods.catalogue import METHODS, method_names, methods_help
from mudsc.methods.record import Method

__all__ = ["METHODS", "Method", "method_names", "methods_help"]
