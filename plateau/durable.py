"""Writes that survive a crash or a power loss: the ledgers' renames are made durable here."""

from __future__ import annotations

import os
from pathlib import Path


def sync_directory(folder: Path) -> None:
    """fsync a folder, so that a rename in it survives a power loss (the reply, or the round,
    that the renamed ledger covers may already have left)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
