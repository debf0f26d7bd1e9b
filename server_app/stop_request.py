"""A stop asked of a running ServerApp from outside it, through a file.

``make run``'s launcher cannot signal the ServerApp itself: in simulation it runs inside Flower's
simulation process, whose own signal handlers end the process without letting the app write its
summary. So the launcher writes the reason (``SIGINT``, ``timeout after 3600 s``) into the file
named by ``PLATEAU_STOP_FILE`` in the run's environment; the round loop looks for it before
every round and while it waits for replies (the round then goes on with the replies it has),
stops, and writes ``summary.json`` with ``status: "stopped"`` and the reason, before the
launcher stops what is left.
"""

from __future__ import annotations

import os
from pathlib import Path

STOP_FILE_ENV = "PLATEAU_STOP_FILE"


def stop_requested() -> str | None:
    """The reason a stop was asked for, or None."""
    path = os.environ.get(STOP_FILE_ENV)
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or "stop requested"
    except OSError:
        return None


def request_stop(path: Path, reason: str) -> None:
    """Ask the run whose environment names ``path`` to stop."""
    path.write_text(reason + "\n")
