"""Errors the data and model layers share (a module of its own, so neither imports the other)."""

from __future__ import annotations


class DataError(RuntimeError):
    """A dataset that cannot be loaded or split as configured."""
