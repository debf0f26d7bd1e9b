"""A node's warm trainer: the ClientApp's work without the cold start of a process per message.

On a real SuperNode Flower starts a new ClientApp process for every message; on its own, that
process would import torch, build the model and load the partition every round. The operator
starts this process once next to the SuperNode instead and names its socket in the node config::

    python -m node.trainer --socket /run/plateau/trainer.sock
    flower-supernode ... --node-config "partition-id=0 num-partitions=2
                                        trainer-socket='/run/plateau/trainer.sock'"

The ClientApp process still receives every message, checks the partition and the node's privacy
floors, and only then hands the message's content and the node's Context to this process over
the Unix socket (mode 0600: only the node's own user can connect). This process runs exactly
what the ClientApp would (:mod:`client_app.compute`), noise drawn per release from the OS, and
answers with the reply and the node's new state, which the ClientApp writes back to Flower.
It keeps no Flower state of its own: between messages it holds only caches (torch, models,
partitions), so it can be restarted at any time.

A message from another app version is refused: both sides hash the source of the app's packages
(:func:`client_app.wire.app_digest`) and the trainer compares. Work is done one message at a
time (several SuperNodes may share one trainer; their messages queue); reading a request and
writing a reply time out, so a stalled peer holds only its own connection.

``--ping`` asks a running trainer whether it serves this app version (exit status 0) and prints
what it has served: a readiness probe, cheap enough to run every few seconds (this module
imports only the standard library; the server, :mod:`node.service`, loads torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
from pathlib import Path
from types import FrameType

from client_app import wire

LOG = logging.getLogger("plateau.trainer")


def claim(path: str) -> None:
    """Make ``path`` free for a new socket: remove a stale socket (nothing listens); refuse
    when a trainer still listens there or the path is something else than a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SystemExit(f"{path} exists and is not a socket: refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
    raise SystemExit(f"a trainer already listens on {path}")


def serve(path: str, threads: int = 0) -> None:
    """Load the app's code and torch, listen on ``path`` and serve until a stop signal;
    ``threads`` > 0 sets torch's thread count."""
    from .service import TrainerServer  # torch, Flower and the app's code

    claim(path)
    try:
        server = TrainerServer(path)
    except OSError as err:
        raise SystemExit(f"cannot listen on {path}: {err.strerror or err}") from None
    if threads > 0:
        import torch

        torch.set_num_threads(threads)

    stop_signals: list[str] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        """Ask the serving loop to end (from a thread: ``shutdown`` waits for the loop). An
        exception raised here instead could land inside socketserver's request handling, which
        reports and swallows it: the trainer would serve on and die by SIGKILL, socket left."""
        if not stop_signals:
            threading.Thread(target=server.shutdown, daemon=True).start()
        stop_signals.append(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    LOG.info("trainer for app %s listening on %s (pid %d)", server.digest, path, os.getpid())
    try:
        server.serve_forever(poll_interval=0.5)
        LOG.info("stopping (%s)", ", ".join(stop_signals))
    finally:
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == server.inode:  # ours, not a successor's
                os.unlink(path)


def ping(path: str, timeout: float) -> int:
    """Ask the trainer at ``path`` whether it serves this app version; print its answer."""
    request = [wire.encode_header({"protocol": wire.PROTOCOL, "app": wire.app_digest(),
                                   "kind": "ping"}), b"", b""]
    try:
        header, _, _ = wire.exchange(path, request, timeout)
    except wire.TrainerError as err:
        print(err, file=sys.stderr)
        return 1
    print(json.dumps(header, sort_keys=True))
    return 0 if header.get("ok") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.trainer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, type=Path,
                        help="the Unix socket to listen on (the node's trainer-socket)")
    parser.add_argument("--ping", action="store_true",
                        help="ask the trainer on --socket whether it serves this app version")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for the work (default: torch's choice, one per core;"
                             " give each trainer its share where several share a host)")
    parser.add_argument("--timeout", type=float, default=10.0, help="--ping: seconds to wait")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.ping:
        return ping(str(args.socket), args.timeout)
    serve(str(args.socket), args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
