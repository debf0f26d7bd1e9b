"""One FedAvg round computed by hand, and a server that no bad reply can corrupt."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from torch import nn

from plateau import messages as wire
from plateau.data import Tensors
from plateau.local import LocalTask
from plateau.privacy.mechanism import GaussianClientDP
from strategies.fedavg import FedAvg, sgd
from tests.helpers import FakeGrid, make_config, reply


def hand_sgd_two_class(w: list[list[float]], x: list[float], label: int, lr: float, wd: float
                       ) -> list[list[float]]:
    """One SGD step of softmax regression (no bias) on one example, written out by hand."""
    logits = [sum(wi * xi for wi, xi in zip(row, x, strict=True)) for row in w]
    top = max(logits)
    exp = [math.exp(z - top) for z in logits]
    probs = [e / sum(exp) for e in exp]
    grad = [[(probs[c] - (c == label)) * xi for xi in x] for c in range(2)]
    return [[w[c][j] - lr * (grad[c][j] + wd * w[c][j]) for j in range(2)] for c in range(2)]


def local_update(x: list[float], label: int, config_kw: dict) -> torch.Tensor:
    model = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(model.weight)
    config = make_config(**config_kw)
    task = LocalTask(model=model, data=Tensors(torch.tensor([x]), torch.tensor([label])),
                     config=config, lr=config.lr, generator=torch.Generator().manual_seed(0))
    sgd(task)
    return model.weight.detach().clone()


def test_local_sgd_matches_the_hand_computed_steps() -> None:
    kw = {"local_steps": 2, "batch_size": 1, "lr": 0.1, "weight_decay": 0.01, "grad_clip": 0.0}
    expected = [[0.0, 0.0], [0.0, 0.0]]
    for _ in range(2):
        expected = hand_sgd_two_class(expected, [1.0, 2.0], 0, lr=0.1, wd=0.01)
    # first step by hand: p = (.5, .5), grad = [[-.5, -1], [.5, 1]] -> W1 = [[.05, .1], [-.05, -.1]]
    first = hand_sgd_two_class([[0, 0], [0, 0]], [1.0, 2.0], 0, 0.1, 0.01)
    assert [v for row in first for v in row] == pytest.approx([0.05, 0.1, -0.05, -0.1])
    assert local_update([1.0, 2.0], 0, kw).flatten().tolist() == pytest.approx(
        [v for row in expected for v in row], abs=1e-6)


def test_grad_clip_bounds_each_step() -> None:
    kw = {"local_steps": 1, "batch_size": 1, "lr": 1.0, "weight_decay": 0.0, "grad_clip": 0.1}
    # unclipped gradient [[-.5, -1], [.5, 1]] has norm sqrt(2.5); clipped to 0.1
    w = local_update([1.0, 2.0], 0, kw)
    assert torch.linalg.vector_norm(w).item() == pytest.approx(0.1, rel=1e-4)


def fedavg_strategy(**config_kw: object) -> tuple[FedAvg, list[Message]]:
    config = make_config(sample_rate=1.0, **config_kw)
    privacy = (GaussianClientDP(config.clip_norm, config.noise_multiplier, placement=config.dp)
               if config.dp_enabled else None)
    strategy = FedAvg(config, parameter_names=["weight"], buffer_names=[], privacy=privacy)
    arrays = ArrayRecord({"weight": torch.zeros(2, 2)})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([11, 12])))
    return strategy, messages


def test_one_fedavg_round_by_hand() -> None:
    kw = {"local_steps": 1, "batch_size": 1, "lr": 0.1, "weight_decay": 0.0, "grad_clip": 0.0}
    strategy, messages = fedavg_strategy(**kw)
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]
    config = messages[0].content["config"]
    assert config["round-lr"] == 0.1 and config["local-steps"] == 1
    assert config["expected-cohort"] == 2 and config["lr"] == 0.1
    # client A: x = (1, 2), y = 0 -> W = [[.05, .1], [-.05, -.1]]
    # client B: x = (2, 0), y = 1 -> grad = [[1, 0], [-1, 0]] -> W = [[-.1, 0], [.1, 0]]
    updates = [local_update([1.0, 2.0], 0, kw), local_update([2.0, 0.0], 1, kw)]
    assert updates[1].flatten().tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.0], abs=1e-7)
    replies = [reply(m, {"weight": u}, train_loss=0.5) for m, u in zip(messages, updates,
                                                                       strict=True)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = torch.tensor([[-0.025, 0.05], [0.025, -0.05]])
    assert arrays["weight"].numpy() == pytest.approx(expected.numpy(), abs=1e-7)
    assert metrics["num-clients"] == 2 and metrics["train-loss"] == pytest.approx(0.5)


def test_sample_count_weighting_when_asked() -> None:
    strategy, messages = fedavg_strategy(weighting="num-examples")
    replies = [reply(messages[0], {"weight": torch.ones(2, 2)}, num_examples=3),
               reply(messages[1], {"weight": torch.zeros(2, 2)}, num_examples=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays["weight"].numpy() == pytest.approx(0.75)


def test_lr_decays_per_round() -> None:
    strategy, _ = fedavg_strategy(lr=0.2, lr_decay=0.5)
    assert [strategy.learning_rate(t) for t in (1, 2, 3)] == pytest.approx([0.2, 0.1, 0.05])


def test_the_strategy_samples_from_the_population_each_round() -> None:
    config = make_config(sample_rate=0.3, seed=7)
    strategy = FedAvg(config, parameter_names=["weight"], buffer_names=[])
    grid = FakeGrid(range(100, 120))
    arrays = ArrayRecord({"weight": torch.zeros(2, 2)})
    first = [m.metadata.dst_node_id for m in strategy.configure_train(1, arrays, ConfigRecord(),
                                                                      grid)]
    assert strategy.clients.population == 20 and len(first) == 6
    assert set(first) <= set(range(100, 120))
    again = [m.metadata.dst_node_id for m in strategy.configure_train(1, arrays, ConfigRecord(),
                                                                      grid)]
    assert again == first  # without DP: reproducible from the seed and the round


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda m: reply(m, {"weight": torch.full((2, 2), float("nan"))}), "non-finite"),
        (lambda m: reply(m, {"weight": torch.zeros(3, 2)}), "wrong-shape"),
        (lambda m: reply(m, {"weight": torch.zeros(2, 2, dtype=torch.float64)}), "wrong-dtype"),
        (lambda m: reply(m, {"other": torch.zeros(2, 2)}), "wrong-keys"),
        (lambda m: reply(m, {"weight": torch.zeros(2, 2)}, num_examples=0), "bad-metrics"),
        (lambda m: Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}),
                           reply_to=m), "malformed"),
        (lambda m: reply(m, {"weight": torch.full((2, 2), 100.0)}), "norm-exceeds-bound"),
        (lambda m: raw_reply(m, Array(dtype="float32", shape=(2, 2), stype="torch.Tensor",
                                      data=b"\0" * 16)), "malformed"),
        (lambda m: raw_reply(m, Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray",
                                      data=b"")), "malformed"),
        (lambda m: raw_reply(m, Array(np.array([["a", "b"], ["c", "d"]]))), "wrong-dtype"),
        (lambda m: extra_record(reply(m, {"weight": torch.zeros(2, 2)})), "unexpected-record"),
        (lambda m: packed_reply(m, {"weight": torch.full((2, 2), float("inf"))}), "non-finite"),
        (lambda m: packed_reply(m, {"weight": torch.zeros(2, 3)}), "wrong-shape"),
        (lambda m: packed_reply(m, {"weight": torch.zeros(2, 2)}, cut=4), "malformed"),
        (lambda m: packed_reply(m, {"weight": torch.zeros(2, 2)}, cut=-4), "malformed"),
        (lambda m: reply(Message(RecordDict({}), dst_node_id=99, message_type=MessageType.TRAIN),
                         {"weight": torch.zeros(2, 2)}), "not-sampled"),
    ],
)
def test_a_bad_reply_is_rejected_and_cannot_move_the_model(bad, reason: str) -> None:
    strategy, messages = fedavg_strategy(dp="central", noise_multiplier=0.0, clip_norm=1.0)
    good = torch.full((2, 2), 0.25)
    result = strategy.train_round(1, [reply(messages[0], {"weight": good}), bad(messages[1])])
    arrays, metrics = result.arrays, result.metrics
    assert result.stats.rejected == {reason: 1}
    assert metrics["num-rejected"] == 1 and metrics["num-clients"] == 1
    # fixed denominator: the one good update divided by the 2 clients sampled
    assert arrays["weight"].numpy() == pytest.approx(0.125)


def extra_record(message: Message) -> Message:
    """A reply smuggling a second ArrayRecord next to its update."""
    message.content["smuggled"] = ArrayRecord({"weight": torch.zeros(2, 2)})
    return message


def test_norm_outliers_are_rejected_without_dp() -> None:
    config = make_config(sample_rate=1.0, norm_outlier_factor=3.0)
    strategy = FedAvg(config, parameter_names=["weight"], buffer_names=[])
    messages = list(strategy.configure_train(1, ArrayRecord({"weight": torch.zeros(2, 2)}),
                                             ConfigRecord(), FakeGrid([1, 2, 3, 4])))
    updates = [torch.full((2, 2), v) for v in (0.1, 0.12, 0.11, 50.0)]
    result = strategy.train_round(1, [reply(m, {"weight": u})
                                      for m, u in zip(messages, updates, strict=True)])
    arrays = result.arrays
    assert result.stats.rejected == {"norm-outlier": 1}
    assert arrays["weight"].numpy() == pytest.approx(0.11)


def packed_reply(to: Message, update: dict[str, torch.Tensor], cut: int = 0) -> Message:
    """A reply in the wire form, as exchange gets it: packed, then unpacked as exchange does
    (so a malformed one reaches the screening still packed). ``cut`` > 0 drops that many bytes
    off the end, < 0 appends as many."""
    record = wire.pack_record(ArrayRecord(update))
    data = record[wire.PACKED_KEY].data
    data = data[:-cut] if cut > 0 else data + b"\0" * -cut
    record = ArrayRecord({wire.PACKED_KEY: Array(
        dtype="uint8", shape=(len(data),), stype=wire.PACKED_STYPE, data=data)})
    sent = Message(RecordDict({"update": record, "metrics": MetricRecord({"num-examples": 1})}),
                   reply_to=to)
    return wire._unpacked_reply(sent)


def test_a_packed_reply_counts_like_flowers_own_form() -> None:
    strategy, sent = fedavg_strategy(dp="central", noise_multiplier=0.0, clip_norm=1.0)
    result = strategy.train_round(1, [packed_reply(sent[0], {"weight": torch.full((2, 2), 0.25)}),
                                      reply(sent[1], {"weight": torch.full((2, 2), 0.25)})])
    assert result.stats.rejected == {}
    assert result.arrays["weight"].numpy() == pytest.approx(0.25)


def raw_reply(to: Message, array: Array) -> Message:
    """A reply whose array was built by hand (possibly undecodable)."""
    return Message(RecordDict({"update": ArrayRecord({"weight": array}),
                               "metrics": MetricRecord({"num-examples": 1})}), reply_to=to)


def test_dp_average_ignores_reported_example_counts() -> None:
    strategy, messages = fedavg_strategy(dp="central", noise_multiplier=0.0, clip_norm=10.0)
    replies = [reply(messages[0], {"weight": torch.ones(2, 2)}, num_examples=1000),
               reply(messages[1], {"weight": torch.zeros(2, 2)}, num_examples=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays["weight"].numpy() == pytest.approx(0.5)


def test_duplicate_and_error_replies_are_counted() -> None:
    strategy, messages = fedavg_strategy()
    first = reply(messages[0], {"weight": torch.ones(2, 2)})
    again = reply(messages[0], {"weight": torch.full((2, 2), 9.0)})
    failed = Message(Error(code=0, reason="boom"), reply_to=messages[1])
    result = strategy.train_round(1, [first, again, failed])
    arrays, metrics = result.arrays, result.metrics
    assert result.stats.rejected == {"duplicate": 1}
    assert metrics["num-failed"] == 1 and metrics["num-clients"] == 1
    assert arrays["weight"].numpy() == pytest.approx(1.0)


def test_no_reply_without_dp_keeps_the_model() -> None:
    strategy, _ = fedavg_strategy()
    assert strategy.aggregate_train(1, []) == (None, None)


def test_a_silos_report_counts_even_when_its_update_is_dropped_as_an_outlier() -> None:
    """Under record-level DP alone, the outlier screen may drop a silo's update; the silo has
    charged its own ledger for the reply, so the server must still show what it spent."""
    config = make_config(sample_rate=1.0, norm_outlier_factor=3.0, record_dp="on")
    strategy = FedAvg(config, parameter_names=["weight"], buffer_names=[])
    messages = list(strategy.configure_train(1, ArrayRecord({"weight": torch.zeros(2, 2)}),
                                             ConfigRecord(), FakeGrid([1, 2, 3, 4])))
    updates = [torch.full((2, 2), v) for v in (0.1, 0.12, 0.11, 50.0)]
    result = strategy.train_round(1, [
        reply(m, {"weight": u}, record_epsilon=0.5 + i)
        for i, (m, u) in enumerate(zip(messages, updates, strict=True))])
    assert result.stats.rejected == {"norm-outlier": 1} and result.stats.accepted == 3
    assert strategy.silos.epsilon == {0: 0.5, 1: 1.5, 2: 2.5, 3: 3.5}
