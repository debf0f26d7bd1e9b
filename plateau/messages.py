"""The wire format between the ServerApp and the ClientApps, in one place.

A train message carries ``arrays`` (the model a client starts from), the algorithm's broadcasts
(one ArrayRecord each: ``direction``, ``momentum``, ``control``, ``perturbation``) and ``config``
(the whole run config plus the round's scalars). A reply is either a train reply (``update``,
``metrics``, and ``buffers`` when BatchNorm statistics travel) or a decline (``decline`` with a
reason). A partition query is answered with ``identity``. Light on purpose: the ClientApp
process Flower starts imports this without torch.

On the wire each ArrayRecord travels packed (:func:`pack_content`): one Array holding every
tensor. Flower moves each Array as its own object (one request and one SuperLink write each,
per hop); a packed record is one object (plus one per 5 MB chunk) whatever the model's layer
count. :func:`exchange` packs what the server sends and unpacks its replies; the client's
``compute.train``/``evaluate`` unpack what they get and pack what they return; everything in
between sees Flower's usual ArrayRecords.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

if TYPE_CHECKING:  # the ClientApp imports this module: no server package at run time
    from flwr.serverapp import Grid

MODEL_KEY = "arrays"
CONFIG_KEY = "config"
UPDATE_KEY = "update"
BUFFERS_KEY = "buffers"
METRICS_KEY = "metrics"
DECLINE_KEY = "decline"  # a client that takes no part in a round, with its reason
IDENTITY_KEY = "identity"  # a node's answer to the partition query: partition-id, num-partitions
SCHEMA_KEY = "schema"  # with it, dataset='local': the silo's schema fingerprint, or its error
EVALUATION_KEY = "evaluation"  # a silo's federated evaluation: sums over its held-out records
TRAIN_REPLY_KEYS = frozenset({UPDATE_KEY, METRICS_KEY, BUFFERS_KEY})
FIRST_LOOK_S = 0.002  # the server's first look for replies; each later wait doubles
PACKED_KEY = "packed"  # a packed record's one Array
PACKED_STYPE = "plateau.packed.v1"  # its serialisation: header length, JSON layout, raw bytes
# the dtype strings a packed header may name (bool, integers, floats: no objects), exactly as
# numpy writes them; a header is never handed to numpy's dtype parser (it reads "f4,(" with ast)
PACKED_DTYPES = {np.dtype(t).newbyteorder(order).str: np.dtype(t).newbyteorder(order)
                 for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                           np.uint16, np.uint32, np.uint64, np.float16, np.float32, np.float64)
                 for order in "<>"}
MAX_PACKED_HEADER = 16 * 2**20  # bytes: ~200k tensors' names and shapes
# benchmarks only: PLATEAU_PACK_ARRAYS=0 sends Flower's one-Array-per-tensor records (both
# forms are always read), to measure what packing saves on a deployed round
PACK_ENV = "PLATEAU_PACK_ARRAYS"


def tensors_record(tensors: Mapping[str, Any]) -> ArrayRecord:
    """Tensors (on any device) as the ArrayRecord that carries them: detached, on the CPU."""
    return ArrayRecord({k: v.detach().cpu() for k, v in tensors.items()})


def packing_enabled() -> bool:
    """Whether this process sends packed records (:data:`PACK_ENV`; on unless set to 0)."""
    return os.environ.get(PACK_ENV, "1") != "0"


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """The record as one Array: an 8-byte little-endian header length, a JSON header of
    ``[name, dtype, shape]`` per tensor in order, then each tensor's bytes (C order)."""
    layout, chunks = [], []
    for name, array in record.items():
        values = array.numpy()
        if values.dtype.str not in PACKED_DTYPES:
            raise ValueError(f"cannot pack array {name!r} of dtype {values.dtype}")
        layout.append([name, values.dtype.str, list(values.shape)])
        chunks.append(values.tobytes(order="C"))
    header = json.dumps(layout, separators=(",", ":")).encode()
    data = b"".join([struct.pack("<Q", len(header)), header, *chunks])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),),
                                          stype=PACKED_STYPE, data=data)})


def is_packed(record: ArrayRecord) -> bool:
    """Whether a record is in :func:`pack_record`'s form."""
    return list(record.keys()) == [PACKED_KEY] and record[PACKED_KEY].stype == PACKED_STYPE


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """A packed record back as Flower's one Array per tensor; any other record as it is.
    ``ValueError`` on anything :func:`pack_record` cannot have written (the bytes may come
    from a client, so each length is checked before it is used)."""
    if not is_packed(record):
        return record
    data = memoryview(record[PACKED_KEY].data)
    if len(data) < 8:
        raise ValueError("packed record shorter than its header length")
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > len(data) - 8:
        raise ValueError("packed record's header runs past its end")
    if header_length > MAX_PACKED_HEADER:
        raise ValueError(f"packed record's header is over {MAX_PACKED_HEADER} bytes")
    try:
        layout = json.loads(bytes(data[8:8 + header_length]))
    except (ValueError, RecursionError):
        raise ValueError("packed record's header is not JSON") from None
    if not isinstance(layout, list):
        raise ValueError("packed record's header is not a list")
    offset, arrays = 8 + header_length, {}
    for entry in layout:
        name, dtype, shape = _layout_entry(entry)
        if name in arrays:
            raise ValueError(f"packed record names {name!r} twice")
        size = dtype.itemsize * math.prod(shape)
        if size > len(data) - offset:
            raise ValueError(f"packed record ends inside array {name!r}")
        values = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=offset)
        arrays[name] = Array(values.reshape(shape))
        offset += size
    if offset != len(data):
        raise ValueError(f"packed record has {len(data) - offset} bytes past its arrays")
    return ArrayRecord(arrays)


def _layout_entry(entry: Any) -> tuple[str, np.dtype, tuple[int, ...]]:
    """One ``[name, dtype, shape]`` of a packed header, checked."""
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
            and isinstance(entry[1], str) and isinstance(entry[2], list)
            and all(type(n) is int and n >= 0 for n in entry[2])):
        raise ValueError(f"packed record's header entry is malformed: {str(entry)[:80]}")
    dtype = PACKED_DTYPES.get(entry[1])
    if dtype is None:
        raise ValueError(f"packed record's dtype {entry[1][:20]!r} is not a plain number type")
    return entry[0], dtype, tuple(entry[2])


PackMemo = dict[int, tuple[ArrayRecord, ArrayRecord]]


def pack_content(content: RecordDict, memo: PackMemo | None = None) -> RecordDict:
    """The content with each ArrayRecord packed (unless packing is off); ``memo`` packs a
    record shared by many messages once (one model broadcast to a whole cohort). It keeps the
    record itself too, so its id cannot be reused by another while the memo lives."""
    if not packing_enabled() or not content.array_records:
        return content
    memo = {} if memo is None else memo
    out = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord) and not is_packed(record):
            if id(record) not in memo:
                memo[id(record)] = (record, pack_record(record))
            record = memo[id(record)][1]
        out[name] = record
    return out


def unpack_content(content: RecordDict) -> RecordDict:
    """The content with each packed ArrayRecord unpacked (``ValueError`` if one is malformed)."""
    if not any(is_packed(record) for record in content.array_records.values()):
        return content
    out = RecordDict()
    for name, record in content.items():
        out[name] = unpack_record(record) if isinstance(record, ArrayRecord) else record
    return out


def _unpacked_reply(reply: Message) -> Message:
    """A reply with its records unpacked; a malformed packed record is left as it came, for
    the server's screening to reject as malformed."""
    if reply.has_content():
        with contextlib.suppress(Exception):  # whatever a client's bytes raise: screened later
            reply.content = unpack_content(reply.content)
    return reply


def train_reply(update: ArrayRecord, metrics: Mapping[str, int | float],
                buffers: ArrayRecord | None = None) -> RecordDict:
    """A client's reply to a train message: its released vector, metrics and buffer deltas."""
    content = RecordDict({UPDATE_KEY: update, METRICS_KEY: MetricRecord(dict(metrics))})
    if buffers is not None:
        content[BUFFERS_KEY] = buffers
    return content


def decline(reason: str) -> RecordDict:
    """The content of a reply that takes no part in the round, with its reason."""
    return RecordDict({DECLINE_KEY: ConfigRecord({"reason": reason})})


def identity(partition_id: int, num_partitions: int,
             schema: Mapping[str, Any] | None = None) -> RecordDict:
    """A node's answer to the partition query; with local data, its schema fingerprint (or
    ``{"error": reason}`` when its data cannot be used)."""
    content = RecordDict({IDENTITY_KEY: MetricRecord({"partition-id": partition_id,
                                                      "num-partitions": num_partitions})})
    if schema is not None:
        content[SCHEMA_KEY] = ConfigRecord(dict(schema))
    return content


def evaluation_reply(examples: int, correct: int, loss_sum: float) -> RecordDict:
    """A silo's federated evaluation of the global model: sums, so the server can weight by
    examples and a lying silo can be caught (more examples than declared, accuracy > 1)."""
    return RecordDict({EVALUATION_KEY: MetricRecord({
        "examples": int(examples), "correct": int(correct), "loss-sum": float(loss_sum)})})


def is_reply_shape(content: RecordDict) -> bool:
    """Whether a train reply has the records of a decline or of a train reply (the trainer's
    answer is checked with this before the ClientApp forwards it)."""
    keys = set(content.keys())
    return keys == {DECLINE_KEY} or {UPDATE_KEY, METRICS_KEY} <= keys <= TRAIN_REPLY_KEYS


def short_reason(reason: str) -> str:
    """The last line of a client's error (Ray wraps it in a traceback), at most 200 chars."""
    lines = [line.strip(" '>") for line in reason.strip().splitlines() if line.strip(" '>")]
    return (lines[-1] if lines else reason)[:200]


def array_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (configs and metrics are negligible)."""
    return sum(len(array.data) for record in content.array_records.values()
               for array in record.values())


def exchange(grid: Grid, messages: Iterable[Message], timeout: float,
             poll_interval: float, should_stop: Callable[[], bool] | None = None
             ) -> list[Message]:
    """Push messages and collect their replies, looking after 2 ms, then waiting twice as long
    each time up to ``poll_interval`` seconds between looks.

    Flower's ``Grid.send_and_receive`` waits 3 s between pulls on a deployed SuperLink, which
    alone adds up to 3 s to every round; a fixed 0.1 s wait still rounded every simulated round
    (~0.1 s of work) up to 0.2 s. Doubling finds a fast round's replies within twice their time
    with a handful of looks, and a slow one's at most ``poll_interval`` late; the replies and
    the timeout are the same. ``should_stop`` ends the wait early (the replies so far).
    """
    # an empty id: a message the SuperLink did not take (Flower 1.43 says so with ""); no
    # reply will come for it, so it is missing from the replies now, not at the deadline
    memo: PackMemo = {}
    outgoing = []
    for message in messages:
        message.content = pack_content(message.content, memo)
        outgoing.append(message)
    pending = {message_id for message_id in grid.push_messages(outgoing) if message_id}
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    wait = min(FIRST_LOOK_S, poll_interval)
    while pending:
        arrived = [_unpacked_reply(reply) for reply in grid.pull_messages(pending)]
        replies.extend(arrived)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
        if not pending or time.monotonic() >= deadline or (should_stop and should_stop()):
            break
        time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
        wait = min(2 * wait, poll_interval)
    return replies
