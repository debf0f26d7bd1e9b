"""An in-process Flower Grid: the real ServerApp loop and the real ClientApp, without Ray.

A study runs hundreds of short simulations; Ray's start (5-15 s) and its worker scheduling would
cost more than the cells themselves on a laptop, and a single process makes a cell bit-identical
from its config and seed. Every message is handled by ``ClientApp.__call__`` with a per-node
``Context`` (``partition-id``, ``num-partitions``, persistent ``state``) exactly as Flower's
simulation engine does; an exception becomes an error reply, as there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1


class LocalGrid(Grid):
    """N nodes in this process; node ``i + 1`` holds partition ``i``. Messages are processed when
    pushed, in order, and their replies wait to be pulled."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any]
                 ) -> None:
        self.client_app = client_app
        self.contexts = {
            node_id: Context(run_id=RUN_ID, node_id=node_id,
                             node_config={"partition-id": node_id - 1,
                                          "num-partitions": num_nodes},
                             state=RecordDict(), run_config=dict(run_config))
            for node_id in range(1, num_nodes + 1)}
        self.replies: dict[str, Message] = {}
        self.sent = 0

    @property
    def run(self) -> Run:
        """The grid's one run (id 1, the id its nodes' contexts carry)."""
        return Run.create_empty(RUN_ID)

    def set_run(self, run_id: int) -> None:
        """Nothing to attach to: the grid is its own federation."""

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self.sent += 1
            message_id = f"local-{self.sent}"
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_run_id"] = RUN_ID
            self.replies[message_id] = self._handle(message)
            ids.append(message_id)
        return ids

    def _handle(self, message: Message) -> Message:
        context = self.contexts.get(message.metadata.dst_node_id)
        if context is None:
            return Message(Error(code=ErrorCode.UNKNOWN, reason="no such node"),
                           reply_to=message)
        try:
            reply = self.client_app(message=message, context=context)
        except Exception as err:  # noqa: BLE001 - Flower turns any ClientApp error into a reply
            reason = f"{type(err)}:<'{err}'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                            reply_to=message)
        reply.metadata.__dict__["_message_id"] = f"reply-{message.metadata.message_id}"
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


@dataclass(frozen=True)
class RunOutput:
    """What a finished run wrote: summary.json, rounds.jsonl and the wall time."""

    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    wall_s: float


def run_local(config: Mapping[str, Any], num_nodes: int, folder: Path,
              grid: LocalGrid | None = None) -> RunOutput:
    """Run Plateau's ServerApp loop with ``config`` over ``num_nodes`` in-process ClientApps
    (or over ``grid``, whose nodes keep their state from an earlier run); results go to
    ``folder`` (``results-dir``/``run-name`` are set here)."""
    from client_app.app import app as client_app
    from server_app.build import load_config, prepare_partitions
    from server_app.loop import run

    # every node is there from the start: no waiting for simulated SuperNodes to register
    config = {"population-size": num_nodes, **config, "results-dir": str(folder.parent),
              "run-name": folder.name}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SUPERLINK_NODE_ID, 1
    # as the launcher does before Flower starts: a split that cannot be made is one error here
    prepare_partitions(load_config(config), num_nodes)
    started = time.monotonic()
    run(grid or LocalGrid(client_app, num_nodes, config), config)
    wall = time.monotonic() - started
    summary = json.loads((folder / "summary.json").read_text())
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    return RunOutput(summary, rounds, wall)
