"""The local socket between a node's ClientApp processes and its warm trainer.

One connection carries one exchange: the client sends three length-prefixed parts (a JSON
header, then two payloads) and the trainer answers with three parts in the same framing. The
payloads are Flower's own protobuf serialisations (``RecordDict``, ``Context``); this module
frames and carries them and knows nothing of Flower or torch: the ClientApp process, which
Flower starts for every message, and ``--ping`` (a readiness probe) import only the standard
library for it.

Request header: ``{"protocol": 1, "app": <digest>, "kind": "ping" | "query" | "train"}``.
Reply header: ``{"ok": true, ...}`` or ``{"ok": false, "error": <why>}``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Sequence
from pathlib import Path

PROTOCOL = 1
KINDS = ("ping", "query", "train", "evaluate")
PARTS = 3  # header, payload, payload: in both directions
MAX_PART_BYTES = 1 << 33  # 8 GiB: a larger length prefix is corruption, not a model
MAX_HEADER_BYTES = 1 << 16
CONNECT_TIMEOUT_S = 10.0  # connecting and sending; the reply may take up to its own timeout
_LENGTH = struct.Struct(">Q")
# the packages whose code decides what a node trains and releases (the local rules live in
# strategies/): the trainer must run the same code as the ClientApp that hands it a message
APP_PACKAGES = ("client_app", "plateau", "strategies")


class TrainerError(RuntimeError):
    """The trainer could not be reached, refused the message, failed, or answered badly."""


@functools.cache
def app_digest() -> str:
    """SHA-256 over the source files of :data:`APP_PACKAGES` as this process sees them (the
    FAB's copy in a ClientApp process, the installed copy in the trainer)."""
    digest = hashlib.sha256()
    for package in APP_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise TrainerError(f"cannot find the package {package!r} to compute the app digest")
        root = Path(spec.submodule_search_locations[0])
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def exchange(path: str, request: list[bytes], timeout: float
             ) -> tuple[dict[str, object], bytes, bytes]:
    """Send one request to the trainer at ``path`` and return its reply (header, two
    payloads)."""
    check_socket(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(path)
            send_parts(sock, request, time.monotonic() + CONNECT_TIMEOUT_S)
        except (ConnectionRefusedError, FileNotFoundError):
            raise TrainerError(f"nothing listens on trainer-socket={path}: the node's trainer "
                               "is not running (start `python -m node.trainer --socket "
                               f"{path}` next to the SuperNode)") from None
        except OSError as err:
            raise TrainerError(f"cannot hand the message to the trainer at {path}: "
                               f"{err.strerror or err}") from None
        try:
            header, reply, state = recv_parts(sock, time.monotonic() + timeout)
            return decode_header(header), reply, state
        except TimeoutError:
            raise TrainerError(f"no reply from the trainer at {path} within {timeout:g} s "
                               "(round-timeout)") from None
        except EOFError:
            raise TrainerError(f"the trainer at {path} closed the connection without a whole "
                               "reply (did it stop? see its log)") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise TrainerError(f"malformed reply from the trainer at {path}: {err}") from None
        except OSError as err:
            raise TrainerError(f"lost the trainer at {path}: {err.strerror or err}") from None


def check_socket(path: str) -> None:
    """Refuse a path that is not a socket of this user's: the node's model and state go there,
    and a socket someone else made would hand them to someone else."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise TrainerError(f"trainer-socket={path} does not exist: the node's trainer is not "
                           f"running (start `python -m node.trainer --socket {path}` next "
                           "to the SuperNode)") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise TrainerError(f"trainer-socket={path} is not a socket")
    if info.st_uid != os.getuid():
        raise TrainerError(f"trainer-socket={path} belongs to uid {info.st_uid}, not to this "
                           f"SuperNode's user (uid {os.getuid()})")


def send_parts(sock: socket.socket, parts: Sequence[bytes], deadline: float) -> None:
    """Send length-prefixed parts; raise TimeoutError past ``deadline`` (time.monotonic)."""
    for part in parts:
        _settimeout(sock, deadline)
        sock.sendall(_LENGTH.pack(len(part)))
        if part:  # the peer may have read all it needs and gone: never send nothing
            _settimeout(sock, deadline)
            sock.sendall(part)


def recv_parts(sock: socket.socket, deadline: float) -> list[bytes]:
    """Receive the :data:`PARTS` parts of one message.

    Raises EOFError when the peer closes first, TimeoutError past ``deadline``, ValueError on a
    length no honest peer sends.
    """
    parts = []
    for index in range(PARTS):
        (size,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size, deadline))
        limit = MAX_HEADER_BYTES if index == 0 else MAX_PART_BYTES
        if size > limit:
            raise ValueError(f"part {index} claims {size} bytes (at most {limit})")
        parts.append(_recv_exact(sock, size, deadline))
    return parts


def encode_header(header: dict[str, object]) -> bytes:
    return json.dumps(header, sort_keys=True).encode()


def decode_header(raw: bytes) -> dict[str, object]:
    """The JSON object of a header part; ValueError for anything else."""
    header = json.loads(raw.decode())
    if not isinstance(header, dict):
        raise ValueError(f"a header is a JSON object, got {type(header).__name__}")
    return header


def _settimeout(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline passed")
    sock.settimeout(remaining)


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    buffer = bytearray(size)
    view, received = memoryview(buffer), 0
    while received < size:
        _settimeout(sock, deadline)
        count = sock.recv_into(view[received:])
        if count == 0:
            raise EOFError(f"connection closed after {received} of {size} bytes")
        received += count
    return bytes(buffer)
