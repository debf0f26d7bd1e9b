"""The ClientApp side of the warm trainer: hand one message's work to the node's trainer.

Flower starts a fresh ClientApp process for every message. With ``trainer-socket=<path>`` in
the node config, that process enforces the node policy, then sends the message's content and
the node's Context (Flower's protobuf serialisation) over the Unix socket to
``python -m node.trainer``, which keeps torch, the model and the partition warm, and gets
back the reply's content and the node's updated state. Nothing is written back unless a whole,
well-formed reply arrived: a dead, hung or confused trainer costs the round, never the state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from flwr.app import Context, RecordDict

from plateau.flower_compat import serde

from . import wire
from .wire import TrainerError

SOCKET_KEY = "trainer-socket"  # node config: where this node's trainer listens


def trainer_socket(node_config: Mapping[str, object]) -> str | None:
    """The node's ``trainer-socket``, or None when this node trains in the ClientApp process.
    A node with a trainer never trains anywhere else: the trainer is where its data and its
    record ledger are, so where this Flower's serialisation is not the one the trainer speaks
    the work is refused, with the reason."""
    value = node_config.get(SOCKET_KEY)
    if not value:
        return None
    if serde() is None:
        raise TrainerError("this node hands its work to a trainer (trainer-socket), but this "
                           "Flower's RecordDict/Context serialisation is not the one the "
                           "trainer speaks (plateau.flower_compat): the work is refused, not "
                           "trained without the trainer's data and record ledger")
    if not os.path.isabs(str(value)):
        raise TrainerError(f"trainer-socket={value} must be an absolute path: the ClientApp "
                           "process and the trainer do not share a working directory")
    return str(value)


def hand_off(path: str, kind: str, content: RecordDict, context: Context,
             timeout: float) -> tuple[RecordDict, RecordDict]:
    """Have the trainer at ``path`` do ``kind`` ("query": prepare; "train": train) for this
    message's content and the node's context; return the reply's content and the node's state
    after it (the caller writes it back once it has checked the reply).

    ``timeout`` bounds the wait for the reply (the server's round-timeout: a later reply would
    be dropped by the server anyway). Raises :class:`TrainerError` with the reason otherwise.
    """
    request = [wire.encode_header({"protocol": wire.PROTOCOL, "app": wire.app_digest(),
                                   "kind": kind}),
               serde().recorddict_to_bytes(content), serde().context_to_bytes(context)]
    header, reply, state = wire.exchange(path, request, timeout)
    if not header.get("ok"):
        raise TrainerError(f"the trainer at {path} refused the {kind} message: "
                           f"{header.get('error', 'no reason given')}")
    return _records(path, reply), _records(path, state)


def _records(path: str, raw: bytes) -> RecordDict:
    try:
        return serde().recorddict_from_bytes(raw)
    except (*serde().decode_errors, ValueError, TypeError) as err:
        raise TrainerError(f"malformed reply from the trainer at {path}: {err}") from None

