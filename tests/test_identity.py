"""Sampling and summing by partition, not by the random node ids Flower assigns; nodes that
cannot say which partition they hold; clients that decline a round."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import flwr.simulation  # noqa: F401 - loads the simulation engine, whose Grid is looked up
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from plateau import messages
from plateau.flower_compat import local_grid_names, simulation_grid_class
from plateau.messages import DECLINE_KEY
from plateau.privacy.mechanism import GaussianClientDP
from strategies.fedavg import FedAvg
from strategies.population import ClientPopulation
from tests.helpers import FakeGrid, identity_reply, make_config, reply

ARRAYS = ArrayRecord({"weight": torch.zeros(2, 2)})


def strategy(**config_kw: object) -> FedAvg:
    config = make_config(**config_kw)
    privacy = (GaussianClientDP(config.clip_norm, config.noise_multiplier, placement=config.dp)
               if config.dp_enabled else None)
    return FedAvg(config, parameter_names=["weight"], buffer_names=[], privacy=privacy)


def sampled_partitions(node_ids: list[int], server_round: int) -> list[int]:
    grid = FakeGrid(node_ids)
    s = strategy(sample_rate=0.3, seed=11)
    messages = s.configure_train(server_round, ARRAYS, ConfigRecord(), grid)
    return [s.clients.partitions[m.metadata.dst_node_id] for m in messages]


def test_the_same_seed_samples_the_same_partitions_whatever_the_node_ids() -> None:
    ids_a = list(range(1000, 1020))
    ids_b = [7 * (20 - i) + 3 for i in range(20)]  # other ids, in another order
    for server_round in (1, 2, 3):
        assert sampled_partitions(ids_a, server_round) == sampled_partitions(ids_b,
                                                                             server_round)


class PickyGrid(FakeGrid):
    """Nodes 1 and 2 both claim partition 0; node 3 answers with an error."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        answers = []
        for m in messages:
            if m.metadata.message_type != MessageType.QUERY:
                continue
            node = m.metadata.dst_node_id
            answers.append(identity_reply(m, 0 if node in (1, 2) else 1, 2) if node != 3 else
                           Message(RecordDict({}), reply_to=m))
        return answers


def test_nodes_without_a_valid_partition_are_left_out() -> None:
    s = strategy(sample_rate=1.0, population_size=2)
    messages = list(s.configure_train(1, ARRAYS, ConfigRecord(), PickyGrid([1, 2, 3])))
    assert len(s.clients.partitions) == 1 and list(s.clients.partitions.values()) == [0]
    assert [m.metadata.dst_node_id for m in messages] == list(s.clients.partitions)


class SilentGrid(FakeGrid):
    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return []


def test_a_run_whose_nodes_never_answer_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="none of the 3 connected nodes answered"):
        strategy().configure_train(1, ARRAYS, ConfigRecord(), SilentGrid([1, 2, 3]))


def declined(to: Message, reason: str = "no-data") -> Message:
    return Message(RecordDict({DECLINE_KEY: ConfigRecord({"reason": reason})}), reply_to=to)


def test_a_client_without_data_declines_and_is_not_rejected() -> None:
    s = strategy(sample_rate=1.0)
    messages = list(s.configure_train(1, ARRAYS, ConfigRecord(), FakeGrid([5, 6])))
    result = s.train_round(1, [reply(messages[0], {"weight": torch.ones(2, 2)}),
                               declined(messages[1])])
    arrays, metrics = result.arrays, result.metrics
    assert result.stats.declined == {"no-data": 1} and not result.stats.rejected
    assert metrics["num-declined"] == 1 and metrics["num-rejected"] == 0
    assert arrays["weight"].numpy() == pytest.approx(1.0)  # the one update, weight 1


def test_under_dp_a_declined_share_is_topped_up() -> None:
    """Distributed placement, 4 clients, 2 decline: the sum still carries sigma*C."""
    s = strategy(sample_rate=1.0, dp="distributed", noise_multiplier=2.0, clip_norm=1.0)
    grid = FakeGrid([1, 2, 3, 4])
    big = ArrayRecord({"weight": torch.zeros(300, 300)})
    messages = list(s.configure_train(1, big, ConfigRecord(), grid))
    from plateau.privacy.noise import ChaChaSource

    shares = [s.privacy.release({"weight": torch.zeros(300, 300)}, 4, ChaChaSource.from_os())[0]
              for _ in range(2)]
    replies = [reply(messages[0], shares[0]), reply(messages[1], shares[1]),
               declined(messages[2]), declined(messages[3])]
    result = s.train_round(1, replies)
    total = torch.from_numpy(result.arrays["weight"].numpy()) * 4
    assert result.stats.declined == {"no-data": 2}
    expected = s.privacy.effective_noise_multiplier(4, 90_000) * 1.0
    assert 2.0 <= expected <= 2.2
    assert total.std().item() == pytest.approx(expected, rel=0.03)


def test_a_node_identified_after_reconfigure_gets_the_final_run_config() -> None:
    """The partition query carries the run config a node warms up for: after the loop settles
    the run name and sigma, a node that joins later must see those, not the build-time ones."""
    config = make_config(dp="central", noise_multiplier=1.0)
    strategy = FedAvg(config, parameter_names=["weight"], buffer_names=[],
                      privacy=GaussianClientDP(1.0, 1.0))
    final = dataclasses.replace(config, run_name="settled", noise_multiplier=2.5)
    strategy.reconfigure(final, GaussianClientDP(1.0, 2.5))
    grid = FakeGrid([7])
    strategy.clients.identify(grid, [7])
    question = grid.sent[0].content["config"]
    assert question["run-name"] == "settled" and question["noise-multiplier"] == 2.5
    assert strategy.screener.privacy is strategy.privacy is strategy.aggregation.mechanism


def sent_reply() -> Message:
    """A reply to a query the SuperLink took (it has an id, as a pushed message does)."""
    question = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    local_grid_names().stamp(question, "question-1")
    return Message(RecordDict(), reply_to=question)


def test_the_server_looks_for_replies_soon_then_less_and_less_often(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast round is seen within twice its time (first look after 2 ms, waits doubling), a
    slow one at most reply-poll-interval late, never more often than that once waits grow."""
    waits: list[float] = []
    monkeypatch.setattr(messages.time, "sleep", waits.append)

    answer = sent_reply()

    class SlowGrid:
        """The one reply arrives at the ninth look."""

        pulls = 0

        def push_messages(self, sent: list[Message]) -> list[str]:
            return [answer.metadata.reply_to_message_id]

        def pull_messages(self, ids: set[str]) -> list[Message]:
            self.pulls += 1
            return [] if self.pulls < 9 else [answer]

    grid = SlowGrid()
    replies = messages.exchange(grid, [], timeout=60, poll_interval=0.1)
    assert waits == pytest.approx([0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.1, 0.1])
    assert grid.pulls == 9 and len(replies) == 1


def test_a_message_the_superlink_did_not_take_is_not_waited_for() -> None:
    """Flower 1.43's push returns "" for a message it could not push: no reply will come, so
    the exchange must not wait the round's timeout for it."""
    answer = sent_reply()

    class LossyGrid:
        def push_messages(self, sent: list[Message]) -> list[str]:
            return ["", answer.metadata.reply_to_message_id]

        def pull_messages(self, ids: set[str]) -> list[Message]:
            assert "" not in ids
            return [answer] if answer.metadata.reply_to_message_id in ids else []

    started = time.monotonic()
    replies = messages.exchange(LossyGrid(), [], timeout=30, poll_interval=0.1)
    assert len(replies) == 1 and time.monotonic() - started < 5


def test_the_studies_grid_pulls_replies_by_either_of_flowers_spellings() -> None:
    """Flower 1.43 renames pull_messages' argument (reply_to_message_ids) and calls it with none
    (every waiting reply); 1.42 passes message_ids."""
    from study.grid import LocalGrid

    def echo(message: Message, context: object) -> Message:
        return Message(RecordDict(), reply_to=message)

    grid = LocalGrid(echo, 2, {})
    sent = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
            for node in (1, 2, 1)]
    first, second, third = grid.push_messages(sent)
    assert [m.metadata.reply_to_message_id for m in grid.pull_messages([first])] == [first]
    assert len(grid.pull_messages(message_ids=[second])) == 1
    assert len(grid.pull_messages(reply_to_message_ids=[second])) == 0  # pulled once
    assert [m.metadata.reply_to_message_id for m in grid.pull_messages()] == [third]


class ArrivingNodes:
    """Nodes that register one every ``gap`` seconds, ``count`` of them, from first use."""

    def __init__(self, count: int, gap: float) -> None:
        self.count, self.gap, self.start = count, gap, None

    def get_node_ids(self) -> list[int]:
        now = time.monotonic()
        self.start = self.start if self.start is not None else now
        arrived = min(self.count, 1 + int((now - self.start) / self.gap))
        self.last_arrival = self.start + (arrived - 1) * self.gap
        return list(range(100, 100 + arrived))


class SimulatedArrivals(ArrivingNodes, simulation_grid_class()):
    """The simulation engine's grid: it registers every node in one quick loop."""


@pytest.mark.slow
@pytest.mark.parametrize(("grid_type", "gap", "settle"), [
    (ArrivingNodes, 0.3, 1.0),  # SuperNodes connecting over the network
    (SimulatedArrivals, 0.03, 0.1),  # the simulation engine's registration loop
])
def test_the_population_is_every_node_that_registers_before_the_count_settles(
    grid_type: type[ArrivingNodes], gap: float, settle: float, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from strategies import population as settling

    monkeypatch.setattr(settling, "POPULATION_SETTLE_S", 1.0)  # conftest shortens it
    grid = grid_type(count=6, gap=gap)
    population = ClientPopulation(make_config(min_available_clients=1), secret=False)
    assert population.determine(grid) == 6
    waited = time.monotonic() - grid.last_arrival
    # a simulation does not wait a network's second (0.8 s of slack for a loaded machine)
    assert settle <= waited < settle + 0.8


@pytest.mark.slow
def test_the_strategies_do_not_import_the_superlink_stack() -> None:
    """`flwr.superlink.grid` pulls in the SuperLink's whole stack (0.8 s here): the launcher's
    config check and every process that builds a strategy would pay it on each start."""
    probe = ("import sys, server_app.build, strategies.registry; "
             "print('flwr.superlink' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    assert out == "False"
