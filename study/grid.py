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
from flwr.serverapp import Grid

from plateau.flower_compat import LocalGridNames, local_grid_names

RUN_ID = 1


class LocalGrid(Grid):
    """N nodes in this process; node ``i + 1`` holds partition ``i``. Messages are processed when
    pushed, in order, and their replies wait to be pulled."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any]
                 ) -> None:
        names = local_grid_names()
        if names is None:
            raise RuntimeError("this Flower's run and message identities are not the ones the "
                               "in-process grid sets; run_local uses Flower's simulation")
        self.flower: LocalGridNames = names
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
    def run(self) -> Any:
        """The grid's one run (id 1, the id its nodes' contexts carry)."""
        return self.flower.empty_run(RUN_ID)

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
            self.flower.stamp(message, message_id, RUN_ID)
            self.replies[message_id] = self._handle(message)
            ids.append(message_id)
        return ids

    def _handle(self, message: Message) -> Message:
        context = self.contexts.get(message.metadata.dst_node_id)
        if context is None:
            return Message(Error(code=self.flower.unknown_error, reason="no such node"),
                           reply_to=message)
        try:
            reply = self.client_app(message=message, context=context)
        except Exception as err:  # noqa: BLE001 - Flower turns any ClientApp error into a reply
            reason = f"{type(err)}:<'{err}'>"
            reply = Message(Error(code=self.flower.client_app_raised, reason=reason),
                            reply_to=message)
        self.flower.stamp(reply, f"reply-{message.metadata.message_id}")
        return reply

    def pull_messages(self, reply_to_message_ids: Iterable[str] | None = None, *,
                      message_ids: Iterable[str] | None = None) -> Iterable[Message]:
        """The replies to these messages (both of Flower's spellings: ``message_ids`` before
        1.43, ``reply_to_message_ids`` after); every waiting reply when given neither."""
        wanted = reply_to_message_ids if reply_to_message_ids is not None else message_ids
        ids = list(self.replies) if wanted is None else list(wanted)
        return [self.replies.pop(i) for i in ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def simulate(config: Mapping[str, Any], num_nodes: int, client_app: ClientApp) -> None:
    """The same run on Flower's simulation engine (one CPU per node)."""
    from flwr.simulation import run_simulation

    from server_app.app import build_server_app

    run_simulation(server_app=build_server_app(dict(config)), client_app=client_app,
                   num_supernodes=num_nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})


@dataclass(frozen=True)
class RunOutput:
    """What a finished run wrote: summary.json, rounds.jsonl and the wall time."""

    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    wall_s: float


def run_local(config: Mapping[str, Any], num_nodes: int, folder: Path,
              grid: LocalGrid | None = None, client_app: ClientApp | None = None) -> RunOutput:
    """Run Plateau's ServerApp loop with ``config`` over ``num_nodes`` in-process ClientApps
    (Plateau's, unless ``client_app`` is given; or over ``grid``, whose nodes keep their state
    from an earlier run); results go to ``folder`` (``results-dir``/``run-name`` are set here).
    Where this Flower lacks what the in-process grid needs
    (``plateau.flower_compat.local_grid_names``), the same run goes through Flower's own
    simulation engine instead (slower; nodes start fresh)."""
    from server_app.build import load_config, prepare_partitions
    from server_app.loop import run

    if client_app is None:
        from client_app.app import app as client_app

    # every node is there from the start: no waiting for simulated SuperNodes to register
    config = {"population-size": num_nodes, **config, "results-dir": str(folder.parent),
              "run-name": folder.name}
    # as the launcher does before Flower starts: a split that cannot be made is one error here
    prepare_partitions(load_config(config), num_nodes)
    names = local_grid_names()
    started = time.monotonic()
    if names is None and grid is None:
        simulate(config, num_nodes, client_app)
    else:
        if names is not None:
            names.set_task_identity(RUN_ID, names.superlink_node_id, 1)
        run(grid or LocalGrid(client_app, num_nodes, config), config)
    wall = time.monotonic() - started
    summary = json.loads((folder / "summary.json").read_text())
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    return RunOutput(summary, rounds, wall)
