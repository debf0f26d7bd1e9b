"""The warm trainer's server: one thread per connection reads a request from a ClientApp
process and writes the reply; the work runs under one lock (see :mod:`node.trainer` for
what the trainer is for and how it is run)."""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
import time

from flwr.app import ConfigRecord, RecordDict

from client_app import compute, wire
from plateau.config import RunConfig
from plateau.flower_compat import Serde, serde
from plateau.messages import SCHEMA_KEY

IO_TIMEOUT_S = 60.0  # to read a request, or to write a reply, after which the peer is dropped
MAX_REASON_CHARS = 4000
LOG = logging.getLogger("plateau.trainer")


class TrainerServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """One thread per connection for the I/O; the work itself, and everything that touches the
    shared models, under one lock."""

    daemon_threads = True

    def __init__(self, path: str) -> None:
        found = serde()
        if found is None:
            raise SystemExit("this Flower's RecordDict/Context serialisation is not the one the "
                             "trainer speaks: run the node without trainer-socket")
        self.serde: Serde = found
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
        if kind not in ("query", "train", "evaluate"):
            return _refusal(f"unknown kind {kind!r}; expected one of {list(wire.KINDS)}")
        started = time.monotonic()
        with self.work_lock:
            try:
                records = self.serde.recorddict_from_bytes(content)
                node_context = self.serde.context_from_bytes(context)
                if kind == "query":
                    schema = compute.prepare(RunConfig.from_record(records["config"]),
                                             node_context)
                    reply = RecordDict() if schema is None else RecordDict(
                        {SCHEMA_KEY: ConfigRecord(schema)})
                elif kind == "evaluate":
                    reply = compute.evaluate(records, node_context)
                else:
                    reply = compute.train(records, node_context)
                answer = ({"ok": True}, self.serde.recorddict_to_bytes(reply),
                          self.serde.recorddict_to_bytes(node_context.state))
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
