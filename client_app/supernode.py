"""``python -m client_app.supernode [--poll-interval S] <flower-supernode arguments>``.

Flower's SuperNode, asking the SuperLink for work every ``S`` seconds (default 0.2) instead of
every 3 s. Flower 1.42's pull loop (``flwr.supernode.start_client_internal``) sleeps 3 s whenever
the SuperLink has nothing for the node and 0.5 s between looks for the ClientApp's reply; on a
deployment that is up to 3.5 s of every round, more than the work of a small model. Everything
else (TLS, authentication, node config, isolation) is ``flower-supernode``'s own, with the same
arguments. The pacing touches only that module's sleeps, and only where the loop is the one
it was written for; any other Flower version runs unchanged, with a warning.
"""

from __future__ import annotations

import inspect
import sys
import time
from logging import INFO, WARNING
from typing import Any

DEFAULT_POLL_INTERVAL = 0.2


class PacedTime:
    """The ``time`` module, except that no sleep lasts longer than ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.interval))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def split_poll_interval(argv: list[str]) -> tuple[float, list[str]]:
    """``--poll-interval`` (either ``--poll-interval=S`` or ``--poll-interval S``) and the rest."""
    rest, interval = [], DEFAULT_POLL_INTERVAL
    args = iter(argv)
    for arg in args:
        if arg == "--poll-interval" or arg.startswith("--poll-interval="):
            value = arg.partition("=")[2] if "=" in arg else next(args, "")
            try:
                interval = float(value)
            except ValueError:
                interval = -1.0
            if not 0 < interval <= 3:
                raise SystemExit(f"--poll-interval must be a number of seconds in (0, 3], "
                                 f"got {value!r}")
        else:
            rest.append(arg)
    return interval, rest


def pace(interval: float) -> bool:
    """Make Flower's SuperNode pull loop wait at most ``interval`` s; False if it is not the
    loop this was written for (then nothing is changed)."""
    from flwr.supercore import log
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    if "time.sleep(3)" not in source or not isinstance(getattr(loop, "time", None),
                                                       type(time)):
        log(WARNING, "this Flower's SuperNode loop is not the one --poll-interval paces: it "
            "runs unchanged")
        return False
    loop.time = PacedTime(interval)  # type: ignore[assignment]
    log(INFO, "SuperNode looks for work every %g s", interval)
    return True


def main(argv: list[str] | None = None) -> None:
    interval, rest = split_poll_interval(list(sys.argv[1:] if argv is None else argv))
    pace(interval)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
