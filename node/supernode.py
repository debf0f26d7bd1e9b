"""``python -m node.supernode [--poll-interval S] <flower-supernode arguments>``.

Flower's SuperNode, asking the SuperLink for work every ``S`` seconds (default 0.2) instead of
every 3 s. Flower 1.42's pull loop sleeps 3 s whenever
the SuperLink has nothing for the node and 0.5 s between looks for the ClientApp's reply; on a
deployment that is up to 3.5 s of every round, more than the work of a small model. The loop
also asks again for the objects of a message that are not at the SuperLink yet (the ServerApp
is still pushing them) after 1 s, then 2, 4... s; paced, after ``S`` s, then every ``4 S`` s at
most. Everything else (TLS, authentication, node config, isolation) is ``flower-supernode``'s
own, with the same arguments. The pacing touches only the loop's sleeps and the backoff of
its object pulls, and only where the loop is the one it was written for
(``plateau.flower_compat.pace_supernode_loop``); any other Flower runs unchanged, with a
warning.
"""

from __future__ import annotations

import sys

from plateau.flower_compat import pace_supernode_loop, run_console_script

DEFAULT_POLL_INTERVAL = 0.2


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


def main(argv: list[str] | None = None) -> None:
    interval, rest = split_poll_interval(list(sys.argv[1:] if argv is None else argv))
    pace_supernode_loop(interval)
    run_console_script("flower-supernode", rest)


if __name__ == "__main__":
    main()
