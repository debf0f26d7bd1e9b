"""Test helpers: configs from keyword names, a fake Grid, replies built by hand."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from plateau.config import RunConfig


def make_config(**overrides: object) -> RunConfig:
    """A RunConfig from python-style names: make_config(local_steps=2) sets local-steps=2."""
    return RunConfig.from_mapping({k.replace("_", "-"): v for k, v in overrides.items()})


class FakeGrid:
    """Just enough of flwr's Grid for the strategies: a fixed set of connected nodes."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        self.sent.extend(messages)
        return []


def reply(to: Message, update: dict[str, torch.Tensor], **metrics: float | int) -> Message:
    """A client's train reply carrying ``update`` (and ``num-examples`` 1 unless given)."""
    values = {"num-examples": 1, **{k.replace("_", "-"): v for k, v in metrics.items()}}
    return Message(
        content=RecordDict({"update": ArrayRecord(update), "metrics": MetricRecord(values)}),
        reply_to=to,
    )
