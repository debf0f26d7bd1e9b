"""The wire format between the ServerApp and the ClientApps, in one place.

A train message carries ``arrays`` (the model a client starts from), the algorithm's broadcasts
(one ArrayRecord each: ``direction``, ``momentum``, ``control``, ``perturbation``) and ``config``
(the whole run config plus the round's scalars). A reply is either a train reply (``update``,
``metrics``, and ``buffers`` when BatchNorm statistics travel) or a decline (``decline`` with a
reason). A partition query is answered with ``identity``. Light on purpose: the ClientApp
process Flower starts imports this without torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

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


def tensors_record(tensors: Mapping[str, Any]) -> ArrayRecord:
    """Tensors (on any device) as the ArrayRecord that carries them: detached, on the CPU."""
    return ArrayRecord({k: v.detach().cpu() for k, v in tensors.items()})


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
    pending = {message_id for message_id in grid.push_messages(messages) if message_id}
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    wait = min(FIRST_LOOK_S, poll_interval)
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
        if not pending or time.monotonic() >= deadline or (should_stop and should_stop()):
            break
        time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
        wait = min(2 * wait, poll_interval)
    return replies
