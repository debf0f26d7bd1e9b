"""The server's run ledger: every DP run's rounds counted once, however many copies of its
checkpoint folder exist.

A checkpoint folder can be copied (a backup restored, a folder duplicated). Each copy's
``ledger.json`` counts only its own rounds, so resuming two copies would release twice the
rounds while each summary claims the epsilon of one. Every run that keeps a privacy ledger
therefore gets a lineage id (random, saved in its checkpoint), and the run ledger, a folder
outside any results folder (``run-ledger``), holds per lineage how many accounting events have
been committed. A round is committed there, under an exclusive lock, only if the count there
equals this copy's count before the round; a resume is refused when the count there is ahead
of the checkpoint's, or when the run ledger does not know the run at all (a copy resumed with
another run-ledger folder). A crash between the checkpoint's ledger and the run ledger leaves
the run ledger behind, never ahead: the resume brings it level.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from plateau.config import ConfigError, RunConfig
from plateau.durable import sync_directory


class CopiedRun(RuntimeError):
    """Another copy of this run's checkpoint has accounted rounds this copy does not know."""


def run_ledger_folder(config: RunConfig) -> Path:
    """``run-ledger``, or $XDG_STATE_HOME/plateau/runs (~/.local/state/plateau/runs)."""
    if config.run_ledger:
        return Path(config.run_ledger).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "plateau" / "runs"


class RunLineage:
    """One run's entry in the run ledger (``<folder>/<lineage>.json``: events committed)."""

    def __init__(self, folder: Path, lineage: str) -> None:
        if not lineage.isalnum():
            raise ConfigError(f"the checkpoint's lineage id {lineage!r} is malformed")
        self.folder, self.lineage = folder, lineage
        self.path = folder / f"{lineage}.json"

    @classmethod
    def start(cls, folder: Path) -> RunLineage:
        """A new run: a fresh lineage with nothing committed."""
        lineage = cls(folder, secrets.token_hex(16))
        with lineage._locked():
            lineage._write(0)
        return lineage

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.folder / f"{self.lineage}.lock", "a")  # noqa: SIM115
        except OSError as err:
            raise ConfigError(f"run-ledger={str(self.folder)!r} cannot be written ({err}); "
                              "set run-ledger to a writable folder outside the results "
                              "folder") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self) -> int:
        if not self.path.is_file():
            return 0
        return int(json.loads(self.path.read_text())["events"])

    def _write(self, events: int) -> None:
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        with temporary.open("w") as handle:
            json.dump({"events": events, "updated": time.time()}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self.path)
        sync_directory(self.folder)

    def check_resume(self, events: int, write: bool = True) -> None:
        """Refuse to resume a checkpoint that another copy has continued past; bring the run
        ledger level with a checkpoint whose last round it missed (a crash in between), unless
        ``write`` is false (a check before the run)."""
        if not self.path.is_file():
            raise ConfigError(
                f"resume refused: the run ledger {self.folder} does not know this run "
                f"(lineage {self.lineage}): resume with the run-ledger folder it started with "
                "(a persistent volume in containers); a copy resumed elsewhere would release "
                "rounds no ledger counts")
        if not write:
            committed = self._read()
            if committed > events:
                raise ConfigError(self._ahead(committed, events))
            return
        with self._locked():
            committed = self._read()
            if committed > events:
                raise ConfigError(self._ahead(committed, events))
            if committed < events:
                self._write(events)

    def _ahead(self, committed: int, events: int) -> str:
        return (f"resume refused: the run ledger ({self.path}) has {committed} rounds of this "
                f"run accounted, its checkpoint {events}: another copy of the checkpoint folder "
                "has continued the run, and resuming this one would release rounds that no "
                "epsilon counts")

    def commit(self, before: int, after: int) -> None:
        """Count a round's events (``before`` -> ``after``), or raise ``CopiedRun`` when
        another copy has committed rounds since this copy last did."""
        with self._locked():
            committed = self._read()
            if committed != before:
                raise CopiedRun(
                    f"the run ledger ({self.path}) has {committed} rounds of this run "
                    f"accounted where this copy has {before}: another copy of its checkpoint "
                    "folder is running; this one stops before releasing the round")
            self._write(after)
