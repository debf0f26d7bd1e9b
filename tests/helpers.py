"""Test helpers: configs from keyword names, a fake Grid, replies built by hand."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from plateau.config import RunConfig
from plateau.flower_compat import local_grid_names


def make_config(**overrides: object) -> RunConfig:
    """A RunConfig from python-style names: make_config(local_steps=2) sets local-steps=2."""
    return RunConfig.from_mapping({k.replace("_", "-"): v for k, v in overrides.items()})


class FakeGrid:
    """Just enough of flwr's Grid for the strategies: a fixed set of connected nodes, the i-th
    of which holds partition i (it answers the server's partition query)."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Queue the answers of ``send_and_receive``; an unanswered message counts as timed out
        at once (the server's exchange does not wait for it). Each message gets an id, as
        the SuperLink gives one to every message it takes."""
        messages = list(messages)
        for message in messages:
            local_grid_names().stamp(message, f"fake-{id(message)}")
        self.answers = list(self.send_and_receive(messages))
        return [answer.metadata.reply_to_message_id for answer in self.answers]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        answers, self.answers = self.answers, []
        return answers

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        messages = list(messages)
        self.sent.extend(messages)
        return [identity_reply(m, self.node_ids.index(m.metadata.dst_node_id),
                               len(self.node_ids))
                for m in messages if m.metadata.message_type == MessageType.QUERY]


def identity_reply(to: Message, partition_id: int, num_partitions: int) -> Message:
    """A node's answer to the partition query."""
    return Message(content=RecordDict({"identity": MetricRecord(
        {"partition-id": partition_id, "num-partitions": num_partitions})}), reply_to=to)


def reply(to: Message, update: dict[str, torch.Tensor], **metrics: float | int) -> Message:
    """A client's train reply carrying ``update`` (and ``num-examples`` 1 unless given)."""
    values = {"num-examples": 1, **{k.replace("_", "-"): v for k, v in metrics.items()}}
    return Message(
        content=RecordDict({"update": ArrayRecord(update), "metrics": MetricRecord(values)}),
        reply_to=to,
    )


def simulate(tmp_path: Path, nodes: int, client_app: Any = None, engine: str = "local",
             run_name: str = "sim", **overrides: object) -> tuple[dict, list[dict]]:
    """Run the ServerApp and ClientApp (Plateau's, unless given) for 2 rounds (unless
    overridden); return summary.json and rounds.jsonl. ``engine="local"``: the studies'
    in-process grid (the same rounds as Flower's engine: tests/test_study.py shows it, ~10 s
    less a run); ``engine="ray"``: Flower's Ray simulation, where the claim is about it."""
    config = {"results-dir": str(tmp_path), "run-name": run_name, "num-server-rounds": 2,
              **{k.replace("_", "-"): v for k, v in overrides.items()}}
    folder = tmp_path / run_name
    if engine == "ray":
        from flwr.simulation import run_simulation

        from server_app.app import build_server_app

        if client_app is None:
            from client_app.app import app as client_app
        run_simulation(
            server_app=build_server_app(config), client_app=client_app, num_supernodes=nodes,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": 2}},
        )
    else:
        from study.grid import run_local

        run_local(config, nodes, folder, client_app=client_app)
    summary = json.loads((folder / "summary.json").read_text())
    rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    return summary, rounds
