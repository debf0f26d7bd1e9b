"""A node's warm trainer: the ClientApp's work without the cold start of a process per message.

On a real SuperNode Flower starts a new ClientApp process for every message; on its own, that
process would import torch, build the model and load the partition every round. The operator
starts this process once next to the SuperNode instead and names its socket in the node config::

    python -m client_app.trainer --socket /run/plateau/trainer.sock
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
what it has served: a readiness probe.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import socketserver
import stat
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from flwr.app import RecordDict
from flwr.common.serde import context_from_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from plateau.config import RunConfig

from . import wire

IO_TIMEOUT_S = 60.0  # to read a request, or to write a reply, after which the peer is dropped
MAX_REASON_CHARS = 4000
LOG = logging.getLogger("plateau.trainer")


class Stop(Exception):
    """SIGTERM, SIGINT or SIGHUP: close the socket and leave."""


class TrainerServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """One thread per connection for the I/O; the work itself, and everything that touches the
    shared models, under one lock."""

    daemon_threads = True

    def __init__(self, path: str) -> None:
        from . import compute  # torch and the app's code, loaded once before listening

        self.compute = compute
        self.digest = wire.app_digest()
        self.work_lock = threading.Lock()
        self.served = {kind: 0 for kind in wire.KINDS}
        self.failed = 0
        self.started = time.monotonic()
        previous = os.umask(0o177)  # the socket is born 0600: no window for another user
        try:
            super().__init__(path, _Handler)
        finally:
            os.umask(previous)
        os.chmod(path, 0o600)
        self.inode = os.stat(path).st_ino

    def answer(self, header: dict[str, object], content: bytes, context: bytes
               ) -> tuple[dict[str, object], bytes, bytes]:
        """The reply to one request: (header, content, state)."""
        if header.get("protocol") != wire.PROTOCOL:
            return _refusal(f"protocol {header.get('protocol')!r}; this trainer speaks "
                            f"{wire.PROTOCOL}")
        if header.get("app") != self.digest:
            return _refusal(f"the message comes from app code {header.get('app')}, this trainer "
                            f"runs {self.digest}: restart the trainer from the same app version "
                            "as the FAB (or remove trainer-socket from the node config)")
        kind = header.get("kind")
        if kind == "ping":
            self.served["ping"] += 1
            return {"ok": True, "app": self.digest, "pid": os.getpid(), "served": dict(self.served),
                    "failed": self.failed,
                    "uptime_s": round(time.monotonic() - self.started, 1)}, b"", b""
        if kind not in ("query", "train"):
            return _refusal(f"unknown kind {kind!r}; expected one of {list(wire.KINDS)}")
        started = time.monotonic()
        with self.work_lock:
            try:
                records = recorddict_from_proto(ProtoRecordDict.FromString(content))
                node_context = context_from_proto(ProtoContext.FromString(context))
                if kind == "query":
                    self.compute.prepare(RunConfig.from_record(records["config"]), node_context)
                    reply = RecordDict()
                else:
                    reply = self.compute.train(records, node_context)
                answer = ({"ok": True}, recorddict_to_proto(reply).SerializeToString(),
                          recorddict_to_proto(node_context.state).SerializeToString())
            except Exception as err:  # any failure of the work goes back as the reason
                LOG.exception("%s failed", kind)
                self.failed += 1
                return _refusal(f"{type(err).__name__}: {err}")
            self.served[kind] += 1
        LOG.info("%s for run %s, node %s (partition %s) in %.3f s", kind, node_context.run_id,
                 node_context.node_id, node_context.node_config.get("partition-id"),
                 time.monotonic() - started)
        return answer


class _Handler(socketserver.BaseRequestHandler):
    server: TrainerServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            header, content, context = wire.recv_parts(sock, time.monotonic() + IO_TIMEOUT_S)
            request = wire.decode_header(header)
        except (TimeoutError, EOFError, ValueError, OSError) as err:
            LOG.warning("dropped a request: %s", err)
            return
        reply = self.server.answer(request, content, context)
        try:
            wire.send_parts(sock, [wire.encode_header(reply[0]), *reply[1:]],
                            time.monotonic() + IO_TIMEOUT_S)
        except (TimeoutError, OSError) as err:
            LOG.warning("could not deliver a reply: %s", err)


def _refusal(reason: str) -> tuple[dict[str, object], bytes, bytes]:
    """A reply that carries only why (cut to fit a header; the whole story is in the log)."""
    return {"ok": False, "error": reason[:MAX_REASON_CHARS]}, b"", b""


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
    claim(path)
    try:
        server = TrainerServer(path)
    except OSError as err:
        raise SystemExit(f"cannot listen on {path}: {err.strerror or err}") from None
    if threads > 0:
        import torch

        torch.set_num_threads(threads)

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise Stop(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    LOG.info("trainer for app %s listening on %s (pid %d)", server.digest, path, os.getpid())
    try:
        server.serve_forever(poll_interval=0.5)
    except Stop as why:
        LOG.info("stopping (%s)", why)
    finally:
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == server.inode:  # ours, not a successor's
                os.unlink(path)


def ping(path: str, timeout: float) -> int:
    """Ask the trainer at ``path`` whether it serves this app version; print its answer."""
    from .handoff import exchange

    request = [wire.encode_header({"protocol": wire.PROTOCOL, "app": wire.app_digest(),
                                   "kind": "ping"}), b"", b""]
    try:
        header, _, _ = exchange(path, request, timeout)
    except wire.TrainerError as err:
        print(err, file=sys.stderr)
        return 1
    print(json.dumps(header, sort_keys=True))
    return 0 if header.get("ok") else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client_app.trainer",
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
