"""``python -m client_app.supernode [--poll-interval S] <flower-supernode arguments>``.

Flower's SuperNode, asking the SuperLink for work every ``S`` seconds (default 0.2) instead of
every 3 s. Flower 1.42's pull loop (``flwr.supernode.start_client_internal``) sleeps 3 s whenever
the SuperLink has nothing for the node and 0.5 s between looks for the ClientApp's reply; on a
deployment that is up to 3.5 s of every round, more than the work of a small model. The loop
also asks again for the objects of a message that are not at the SuperLink yet (the ServerApp
is still pushing them) after 1 s, then 2, 4... s; paced, after ``S`` s, then every ``4 S`` s at
most. Everything else (TLS, authentication, node config, isolation) is ``flower-supernode``'s
own, with the same arguments. The pacing touches only that module's sleeps and the backoff of
its object pulls, and only where the loop is the one it was written for; any other Flower
version runs unchanged, with a warning.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable
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


def split_poll_interval(argv: list[str], name: str = "--poll-interval",
                        default: float = DEFAULT_POLL_INTERVAL) -> tuple[float, list[str]]:
    """``name`` (either ``NAME=S`` or ``NAME S``; the last one counts) and the rest."""
    rest, interval = [], default
    args = iter(argv)
    for arg in args:
        if arg == name or arg.startswith(f"{name}="):
            value = arg.partition("=")[2] if "=" in arg else next(args, "")
            try:
                interval = float(value)
            except ValueError:
                interval = -1.0
            if not 0 < interval <= 3:
                raise SystemExit(f"{name} must be a number of seconds in (0, 3], got {value!r}")
        else:
            rest.append(arg)
    return interval, rest


def paced_pulls(pull: Callable[..., Any], interval: float) -> Callable[..., Any] | None:
    """``pull`` (Flower's ``pull_objects`` or ``pull_and_inflate_object_from_tree``) retrying an
    object that is not there yet after ``interval`` s, then at most every ``4 * interval`` s,
    instead of after 1 s, doubling up to 10 s; None if ``pull`` has no such parameters."""
    parameters = inspect.signature(pull).parameters
    if not {"initial_backoff", "backoff_cap"} <= set(parameters):
        return None
    first = min(interval, parameters["initial_backoff"].default)
    cap = max(first, min(4 * interval, parameters["backoff_cap"].default))

    @functools.wraps(pull)
    def paced(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", first)
        kwargs.setdefault("backoff_cap", cap)
        return pull(*args, **kwargs)

    paced.paced_interval = interval  # type: ignore[attr-defined]
    return paced


def pace(interval: float) -> bool:
    """Make Flower's SuperNode pull loop wait at most ``interval`` s for work, and retry the
    objects of a message it is pulling (the ServerApp may still be pushing them) after
    ``interval`` s, at most ``4 * interval`` s; False if it is not the loop this was written for
    (then nothing is changed)."""
    from flwr.supercore import log
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    pull = getattr(loop, "pull_objects", None)
    paced = paced_pulls(pull, interval) if callable(pull) else None
    if ("time.sleep(3)" not in source or "pull_objects(" not in source or paced is None
            or not isinstance(getattr(loop, "time", None), type(time))):
        log(WARNING, "this Flower's SuperNode loop is not the one --poll-interval paces: it "
            "runs unchanged")
        return False
    loop.time = PacedTime(interval)  # type: ignore[assignment]
    loop.pull_objects = paced  # type: ignore[assignment]
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
