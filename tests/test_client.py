"""The ClientApp called directly: what it releases under each privacy setting."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client_app.app import NodeConfigError
from client_app.app import app as client_app
from plateau import messages
from plateau.config import RunConfig
from plateau.data import DATASETS
from plateau.models import build_model
from plateau.privacy.mechanism import flat_norm
from server_app.app import build_strategy
from tests.helpers import FakeGrid, make_config


def train_message(**config_kw: object) -> Message:
    """A round-1 train message exactly as the server's strategy builds it."""
    config = make_config(sample_rate=1.0, local_steps=3, min_available_clients=1, **config_kw)
    strategy = build_strategy(config)
    arrays = ArrayRecord({k: v.cpu() for k, v in strategy.current.items()})
    return next(iter(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([7]))))


def context(**node_config: int) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config or
                   {"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config={})


def released(reply: Message) -> dict[str, torch.Tensor]:
    """The update a reply carries, read as the server reads it (the ClientApp answers in the
    wire form: records packed)."""
    return {k: torch.from_numpy(v.numpy()) for k, v in received(reply)["update"].items()}


def received(reply: Message) -> RecordDict:
    """A reply's content as the server's exchange hands it on: unpacked."""
    return messages.unpack_content(reply.content)


def test_plain_fedavg_releases_the_raw_update_of_every_parameter() -> None:
    message = train_message()
    reply = client_app(message, context())
    update = released(reply)
    model = build_model(RunConfig().model, DATASETS["digits"])
    assert sorted(update) == sorted(n for n, _ in model.named_parameters())
    assert flat_norm(update) > 0
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 1 and metrics["train-loss"] > 0
    assert "buffers" not in reply.content.array_records


def test_training_is_reproducible_for_a_given_seed_round_and_partition() -> None:
    message = train_message()
    first = released(client_app(message, context()))
    second = released(client_app(message, context()))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_central_dp_release_is_clipped_and_reports_diagnostics() -> None:
    message = train_message(dp="central", clip_norm=0.05, noise_multiplier=1.0)
    reply = client_app(message, context())
    assert flat_norm(released(reply)) <= 0.05 * (1 + 1e-5)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 1  # partition size is private: a constant under DP
    assert metrics["clipped"] == 1 and metrics["update-norm"] > 0.05


def test_local_dp_release_is_noised_and_carries_no_diagnostics() -> None:
    message = train_message(dp="local", clip_norm=0.05, noise_multiplier=2.0, model="cnn")
    reply = client_app(message, context())
    update = released(reply)
    numel = sum(t.numel() for t in update.values())
    # the noise alone has norm ~ sigma*C*sqrt(d), far above C; with d = 90k its relative spread
    # is 1/sqrt(2d) = 0.24%, so 5% is 20 standard deviations
    assert flat_norm(update) == pytest.approx(2.0 * 0.05 * numel**0.5, rel=0.05)
    assert dict(reply.content["metrics"]) == {"num-examples": 1}


def test_batchnorm_buffers_travel_separately_and_in_the_clear() -> None:
    message = train_message(model="resnet10", norm="batch", model_width=4)
    reply = client_app(message, context())
    content = received(reply)
    assert "buffers" in content.array_records
    assert all("running" in k for k in content["buffers"])
    assert not any("running" in k for k in content["update"])


def test_supernode_without_partition_fails_with_a_clear_reason() -> None:
    message = train_message()
    bare = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    # Flower turns this exception into an error reply carrying the message
    with pytest.raises(NodeConfigError, match="--node-config 'partition-id=<i> num-partitions"):
        client_app(message, bare)


def test_distributed_noise_share_uses_the_cohort_capped_by_the_population() -> None:
    """A server claiming a huge cohort cannot shrink the noise share below sigma*C/sqrt(N)."""
    message = train_message(dp="distributed", clip_norm=0.05, noise_multiplier=2.0, model="cnn")
    message.content["config"]["expected-cohort"] = 10_000.0
    reply = client_app(message, context(**{"partition-id": 0, "num-partitions": 4}))
    update = released(reply)
    numel = sum(t.numel() for t in update.values())
    assert flat_norm(update) == pytest.approx(2.0 * 0.05 / 2 * numel**0.5, rel=0.05)
    assert dict(reply.content["metrics"]) == {"num-examples": 1}


@pytest.mark.parametrize(
    ("run", "node", "fragment"),
    [
        ({"dp": "central"}, {"require-dp": "local"}, "requires dp='local' or stronger"),
        ({}, {"require-dp": "central"}, "requires dp='central' or stronger"),
        ({"dp": "local", "noise_multiplier": 0.5}, {"min-noise-multiplier": 1.0},
         "below this SuperNode's min-noise-multiplier=1.0"),
        ({"dp": "local", "clip_norm": 5.0}, {"max-clip-norm": 1.0}, "above this SuperNode's"),
        ({"dp": "distributed", "dp_clip_mode": "code"}, {"require-dp": "distributed"},
         "not differentially private"),
    ],
)
def test_a_supernode_refuses_weaker_privacy_than_its_operator_set(run: dict, node: dict,
                                                                   fragment: str) -> None:
    message = train_message(**run)
    with pytest.raises(NodeConfigError, match=fragment):
        client_app(message, context(**{"partition-id": 0, "num-partitions": 4, **node}))


def test_a_supernode_floor_that_is_met_trains_normally() -> None:
    message = train_message(dp="local", noise_multiplier=1.0, clip_norm=0.5)
    node = {"partition-id": 0, "num-partitions": 4, "require-dp": "distributed",
            "min-noise-multiplier": 1.0, "max-clip-norm": 1.0}
    assert "update" in client_app(message, context(**node)).content.array_records


def test_a_client_without_examples_declines_the_round() -> None:
    """1,000 Dirichlet partitions of 1,437 digits: a fifth are empty (partition 0 is); the node
    says so instead of replying with a malformed update. It still answers the partition query."""
    from plateau.data import PartitionSpec, partition_sizes

    assert partition_sizes(PartitionSpec("digits", 0.2, 0, 1000, "dirichlet", 0.5, 2))[0] == 0
    message = train_message()
    node = {"partition-id": 0, "num-partitions": 1000}
    reply = client_app(message, context(**node))
    assert set(reply.content.keys()) == {"decline"}
    assert reply.content["decline"]["reason"] == "no-data"
    query = Message(RecordDict({"config": ConfigRecord({"question": "partition-id"})}),
                    dst_node_id=7, message_type=MessageType.QUERY)
    identity = client_app(query, context(**node)).content["identity"]
    assert identity["partition-id"] == 0 and identity["num-partitions"] == 1000
