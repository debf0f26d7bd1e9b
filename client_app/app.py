"""The ClientApp: K local steps from the global model, then release the clipped, noised update."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from plateau.config import RunConfig
from plateau.data import Tensors as DataTensors
from plateau.data import client_partition
from plateau.device import resolve_device, seeded_generator
from plateau.models import (
    float_buffer_names,
    frozen_digest,
    input_spec,
    load_travelling,
    model_from_config,
)
from plateau.noise import secure_source, test_seed
from plateau.privacy import (
    Tensors,
    flat_norm,
    mechanism_from_config,
    random_support,
)

from .training import LOCAL_RULES, LocalTask

app = ClientApp()
STATE_ROUNDS = "rounds"  # how many rounds this node's algorithm state has accumulated
DECLINE_KEY = "decline"  # a reply that trains nothing, with its reason


class NodeConfigError(ValueError):
    """A SuperNode started without the partition it should train on."""


def partition_of(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config (set per SuperNode)."""
    try:
        pid, num = int(context.node_config["partition-id"]), int(
            context.node_config["num-partitions"])
    except (KeyError, ValueError, TypeError):
        raise NodeConfigError(
            "this SuperNode has no valid partition: start it with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from None
    return pid, num


@functools.lru_cache(maxsize=4)
def _model(cfg: RunConfig, device: torch.device) -> tuple[nn.Module, str]:
    """One model per configuration and process, with the digest of its frozen weights: frozen
    weights are loaded once per worker, the travelling ones every round."""
    model = model_from_config(cfg).to(device)
    return model, frozen_digest(model)


@functools.lru_cache(maxsize=512)
def _partition_on(cfg: RunConfig, pid: int, num: int, device: torch.device) -> DataTensors:
    """This node's training tensors, already on the training device."""
    return client_partition(
        cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed, num_partitions=num,
        partition_id=pid, partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha,
        classes_per_client=cfg.classes_per_client, spec=input_spec(cfg),
    ).to(device)


def local_round(task: LocalTask, rule: str, cohort: float,
                start_buffers: dict[str, torch.Tensor], mask_seed: int | None = None,
                noise_labels: tuple[int, ...] = ()) -> RecordDict:
    """Run a local rule, privatise what it releases, and build the reply's records.

    ``mask_seed`` (FedSMP) restricts the release to the round's public random subset of
    coordinates: the update is sparsified, then clipped, then noised on that subset only.
    ``noise_labels`` name the draw for the test-only seeded path (PLATEAU_TEST_SEED); otherwise
    the noise is keyed by the operating system.
    """
    config = task.config
    state_rounds = int(task.state.pop(STATE_ROUNDS, {"n": torch.zeros(())})["n"])
    released = LOCAL_RULES[rule].run(task)
    state = task.model.state_dict()
    buffers = {name: state[name] - start for name, start in start_buffers.items()}
    support = (random_support(released, config.smp_keep, mask_seed)
               if mask_seed is not None else None)
    metrics: dict[str, int | float] = {"num-examples": len(task.data)}
    diagnostics = {"train-loss": task.mean_loss(), "state-rounds": state_rounds}
    if task.state:
        task.state[STATE_ROUNDS] = {"n": torch.tensor(state_rounds + 1)}
    mechanism = mechanism_from_config(config)
    if mechanism is None:
        if support is not None:
            released = {k: v * support[k] for k, v in released.items()}
        metrics |= diagnostics | {"update-norm": flat_norm(released)}
    else:
        released, report = mechanism.release(
            released, cohort, secure_source("client-noise", *noise_labels), support=support)
        # Under DP the data size is private (constant weight). Only in central placement, where
        # the server is trusted with the clipped updates anyway, does it also get diagnostics.
        metrics = {"num-examples": 1}
        if config.dp == "central":
            metrics |= diagnostics | {"update-norm": report.norm,
                                      "clipped": int(report.clipped), "clip-error": report.error}
        if test_seed() is not None:  # this node's noise is predictable: the run claims no epsilon
            metrics["test-seeded"] = 1
    content = RecordDict({
        "update": ArrayRecord({k: v.detach().cpu() for k, v in released.items()}),
        "metrics": MetricRecord(metrics),
    })
    if buffers:
        content["buffers"] = ArrayRecord({k: v.cpu() for k, v in buffers.items()})
    return content


PROTECTION = {"off": 0, "central": 1, "distributed": 2, "local": 3}


def enforce_node_policy(config: RunConfig, node_config: Mapping[str, object]) -> None:
    """Refuse a round whose privacy is weaker than this SuperNode's operator allows.

    The run config (and so every round's message) comes from whoever submits the run. A node
    that does not trust the server sets floors in its own node config, e.g.
    ``--node-config "partition-id=0 num-partitions=10 require-dp='local' min-noise-multiplier=1.0
    max-clip-norm=1.0"``.
    """
    required = str(node_config.get("require-dp", "off"))
    if required not in PROTECTION:
        raise NodeConfigError(f"require-dp={required!r}; expected one of {list(PROTECTION)}")
    if PROTECTION[config.dp] < PROTECTION[required]:
        raise NodeConfigError(f"this SuperNode requires dp={required!r} or stronger; the run "
                              f"asks for dp={config.dp!r}")
    floor = float(node_config.get("min-noise-multiplier", 0.0))
    if config.dp_enabled and config.noise_multiplier < floor:
        raise NodeConfigError(f"noise-multiplier={config.noise_multiplier} is below this "
                              f"SuperNode's min-noise-multiplier={floor}")
    ceiling = float(node_config.get("max-clip-norm", math.inf))
    if config.dp_enabled and config.clip_norm > ceiling:
        raise NodeConfigError(f"clip-norm={config.clip_norm} is above this SuperNode's "
                              f"max-clip-norm={ceiling}")
    if required != "off" and config.dp_clip_mode != "flat":
        raise NodeConfigError("dp-clip-mode='code' is not differentially private; this "
                              "SuperNode requires a formal guarantee")


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds: it samples and sums by partition, not
    by the random node ids Flower assigns, so a seeded run repeats. When the question carries
    the run config, prepare for round 1 meanwhile: the model, this partition's tensors and
    torch's first backward pass (round 1 then costs what later rounds do)."""
    pid, num = partition_of(context)
    question = msg.content.config_records.get("config", ConfigRecord())
    if RunConfig.keys() <= set(question):
        cfg = RunConfig.from_record(question)
        device = resolve_device(cfg.device)
        data = _partition_on(cfg, pid, num, device)
        _warm(cfg, device, data.x[:cfg.batch_size], data.y[:cfg.batch_size])
    return Message(RecordDict({"identity": MetricRecord({"partition-id": pid,
                                                         "num-partitions": num})}),
                   reply_to=msg)


def _warm(cfg: RunConfig, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward and backward pass on a batch, once per process and config, results
    discarded (the model's weights are not touched): torch sets up its kernels and allocator
    here rather than in round 1."""
    if len(y) == 0 or (cfg, device) in _WARMED:
        return
    model, _ = _model(cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params)
    _WARMED.add((cfg, device))


_WARMED: set[tuple[RunConfig, torch.device]] = set()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the local rule the server asked for and reply with the released update."""
    round_config = msg.content["config"]
    cfg = RunConfig.from_record(round_config)
    server_round, lr = int(round_config["server-round"]), float(round_config["round-lr"])
    rule = str(round_config["local-rule"])
    if rule not in LOCAL_RULES:
        raise ValueError(f"unknown local rule {rule!r}; this client knows {sorted(LOCAL_RULES)}")
    pid, num = partition_of(context)
    enforce_node_policy(cfg, context.node_config)
    device = resolve_device(cfg.device)

    model, digest = _model(cfg, device)
    expected = str(round_config.get("frozen-digest", digest))
    if expected != digest:
        raise ValueError(f"this node's frozen weights (digest {digest}) differ from the "
                         f"server's ({expected}): same model files and library versions needed")
    data = _partition_on(cfg, pid, num, device)
    if len(data) == 0:
        return decline(msg, "no-data")
    load_travelling(model, msg.content["arrays"].to_torch_state_dict())
    state = model.state_dict()
    start_buffers = {name: state[name].detach().clone() for name in float_buffer_names(model)}
    broadcast = {
        name: {k: v.to(device) for k, v in record.to_torch_state_dict().items()}
        for name, record in msg.content.array_records.items() if name != "arrays"
    }
    task = LocalTask(
        model=model, data=data, config=cfg, lr=lr,
        broadcast=broadcast, generator=seeded_generator(cfg.seed, server_round, pid),
        state=load_state(context, cfg.algorithm, device),
    )
    # A server claiming a larger cohort would shrink each client's distributed noise share;
    # the cohort can never exceed the population this node belongs to.
    cohort = min(float(round_config["expected-cohort"]), float(num))
    mask_seed = round_config.get("mask-seed")
    content = local_round(task, rule, cohort, start_buffers,
                          int(mask_seed) if mask_seed is not None else None,
                          noise_labels=(server_round, pid))
    save_state(context, cfg.algorithm, task.state)
    return Message(content=content, reply_to=msg)


def decline(msg: Message, reason: str) -> Message:
    """A reply that takes no part in the round (e.g. a partition without examples): counted by
    the server as declined, never as a malformed reply; under DP its noise share is topped up
    like a dropout's."""
    return Message(RecordDict({DECLINE_KEY: ConfigRecord({"reason": reason})}), reply_to=msg)


def load_state(context: Context, algorithm: str, device: torch.device) -> dict[str, Tensors]:
    """This node's algorithm state (SCAFFOLD's c_i, FedDyn's H_i, ...) from Context.state,
    which the SuperNode keeps across rounds. State of another algorithm is ignored."""
    prefix = f"{algorithm}/"
    return {
        name[len(prefix):]: {k: v.to(device) for k, v in record.to_torch_state_dict().items()}
        for name, record in context.state.array_records.items() if name.startswith(prefix)
    }


def save_state(context: Context, algorithm: str, state: dict[str, Tensors]) -> None:
    """Write the node's algorithm state back for the next round."""
    for name, tensors in state.items():
        context.state[f"{algorithm}/{name}"] = ArrayRecord(
            {k: v.detach().cpu() for k, v in tensors.items()})
