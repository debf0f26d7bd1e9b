"""The mistakes a new user made in their first hour (issue 32), each through `make run` exactly as
typed, with the exit code, the seconds to fail and the message: a table.

    python benchmarks/first_hour.py [--only NAME] [--markdown]

Every case must fail before Flower starts: exit code 2, within 10 s, one line naming the key and
the fix, no traceback, nothing left behind (`tests/test_first_hour.py` holds it to that).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    name: str
    clients: str  # CLIENTS as typed
    config: str  # CONFIG as typed (before the results folder this script adds)
    expect: str  # a phrase the one line must hold
    setup: Callable[[Path], object] | None = None  # prepares the folder (a checkpoint, a port)


def saved_checkpoint(results: Path) -> None:
    """A finished run 'earlier' with model='linear' (what the user then resumes changed)."""
    sys.path.insert(0, str(ROOT))
    from plateau.config import RunConfig
    from server_app.checkpoint import Checkpointer, privacy_settings

    config = RunConfig.from_mapping({"run-name": "earlier", "results-dir": str(results)})
    Checkpointer(results / "earlier" / "checkpoint").save(
        {"round": 2, "privacy": privacy_settings(config), "model": {},
         "config": config.to_dict()})


@contextmanager
def busy_port() -> Iterator[int]:
    """A port something already listens on (another run's metrics exporter)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


CASES = (
    Case("distributed DP without noise", "5", "dp='distributed' noise-multiplier=0",
         "noise-multiplier=0 with dp='distributed'"),
    Case("local DP without noise", "5", "dp='local' noise-multiplier=0",
         "noise-multiplier=0 with dp='local'"),
    Case("resume without a checkpoint", "5", "resume=true run-name='never-ran'",
         "no checkpoint at"),
    Case("resume with another model", "5", "resume=true run-name='earlier' model='cnn'",
         "model 'linear' -> 'cnn'", saved_checkpoint),
    Case("metrics port in use", "5", "metrics-port={port}", "cannot be opened"),
    Case("misspelled key", "5", "num-server-round=3", "did you mean 'num-server-rounds'"),
    Case("unterminated string", "5", "dp='central", "the string is not closed; write "
         "dp='central'"),
    Case("double quotes in CONFIG", "5", 'dp="centrl"', "dp='centrl' is not allowed"),
    Case("CLIENTS=0", "0", "", "CLIENTS=0"),
    Case("too many clients on digits", "3000", "partitioner='iid'", "at most 1,437 clients"),
    Case("a Hub dataset offline", "5", "dataset='cifar10'", "cannot be reached"),
    Case("a string for a number", "5", "num-server-rounds='ten'", "expected int"),
    Case("a rate above 1", "5", "sample-rate=1.5", "sample-rate=1.5 is not allowed"),
    Case("an unknown placement", "5", "dp='centrl'", "dp='centrl' is not allowed"),
)


@dataclass(frozen=True)
class Outcome:
    case: Case
    code: int
    seconds: float
    message: str  # the last line of stderr
    lines: int  # stderr lines
    traceback: bool
    leftovers: list[str]  # files the failed run left in its results folder


def attempt(case: Case, timeout: float = 120.0) -> Outcome:
    """`make -s run CLIENTS=... CONFIG=...` as the user typed it, in a fresh results folder."""
    with tempfile.TemporaryDirectory() as folder, busy_port() as port:
        results = Path(folder) / "results"
        if case.setup is not None:
            case.setup(results)
        before = {p for p in results.rglob("*")} if results.exists() else set()
        config = f"results-dir='{results}' " + case.config.replace("{port}", str(port))
        # as typed at a shell: not a sub-make of `make test` (which would print make[1]: lines)
        env = {key: value for key, value in os.environ.items()
               if key not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
        env = {**env, "FLWR_HOME": str(Path(folder) / "flwr-home"),
               "PLATEAU_DATA_DIR": os.environ.get("PLATEAU_DATA_DIR",
                                                  str(Path.home() / ".cache" / "plateau"))}
        started = time.monotonic()
        proc = subprocess.run(["make", "-s", "run", f"CLIENTS={case.clients}",
                               f"CONFIG={config}"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
        seconds = time.monotonic() - started
        after = {p for p in results.rglob("*")} if results.exists() else set()
    lines = [line for line in proc.stderr.splitlines() if line.strip()
             and not re.match(r"make(\[\d+\])?: ", line)]
    # make itself exits 2 whenever its recipe fails: the launcher's own code is in its message
    failed = re.search(r"^make(?:\[\d+\])?: \*\*\* \[.*\] Error (\d+)$", proc.stderr, re.MULTILINE)
    code = int(failed.group(1)) if failed else proc.returncode
    return Outcome(case, code, seconds, lines[-1] if lines else "", len(lines),
                   "Traceback" in proc.stdout + proc.stderr,
                   sorted(str(p.relative_to(results)) for p in after - before))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="one case, by name")
    args = parser.parse_args()
    print("| try | CLIENTS | CONFIG | exit | s | message |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        if args.only and case.name != args.only:
            continue
        outcome = attempt(case)
        message = outcome.message.replace("|", "\\|")[:220]
        extra = (" (traceback)" if outcome.traceback else "") + (
            f" (left {outcome.leftovers})" if outcome.leftovers else "")
        print(f"| {case.name} | {case.clients} | `{case.config}` | {outcome.code} | "
              f"{outcome.seconds:.1f} | {message}{extra} |", flush=True)


if __name__ == "__main__":
    main()
