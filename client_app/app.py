"""The ClientApp: K local steps from the global model, then release the clipped, noised update."""

from __future__ import annotations

import functools

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from plateau.config import RunConfig
from plateau.data import DATASETS, Tensors, client_partition
from plateau.device import resolve_device, seeded_generator
from plateau.models import build_model, float_buffer_names
from plateau.privacy import GaussianClientDP, noise_generator

from .training import LOCAL_RULES, LocalTask

app = ClientApp()


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
def _model(name: str, dataset: str, norm: str, width: int, device: torch.device) -> nn.Module:
    """One model object per architecture and process; weights are loaded every round."""
    return build_model(name, DATASETS[dataset], norm=norm, width=width).to(device)


@functools.lru_cache(maxsize=512)
def _partition_on(cfg: RunConfig, pid: int, num: int, device: torch.device) -> Tensors:
    """This node's training tensors, already on the training device."""
    return client_partition(
        cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed, num_partitions=num,
        partition_id=pid, partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha,
        classes_per_client=cfg.classes_per_client,
    ).to(device)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the local rule the server asked for and reply with the released update."""
    round_config = msg.content["config"]
    cfg = RunConfig.from_record(round_config)
    server_round, lr = int(round_config["server-round"]), float(round_config["lr"])
    rule = LOCAL_RULES[str(round_config["local-rule"])]
    pid, num = partition_of(context)
    device = resolve_device(cfg.device)

    model = _model(cfg.model, cfg.dataset, cfg.norm, cfg.model_width, device)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    broadcast = {
        name: {k: v.to(device) for k, v in record.to_torch_state_dict().items()}
        for name, record in msg.content.array_records.items() if name != "arrays"
    }
    data = _partition_on(cfg, pid, num, device)
    train_loss = rule(LocalTask(
        model=model, data=data, config=cfg, lr=lr, broadcast=broadcast,
        generator=seeded_generator(cfg.seed, server_round, pid),
    ))

    state = model.state_dict()
    update = {
        name: (p.detach() - start[name]) for name, p in model.named_parameters() if p.requires_grad
    }
    buffers = {name: state[name] - start[name] for name in float_buffer_names(model)}
    metrics: dict[str, int | float] = {"num-examples": len(data)}
    if cfg.dp_enabled:
        mechanism = GaussianClientDP(cfg.clip_norm, cfg.noise_multiplier, placement=cfg.dp)
        update, report = mechanism.release(
            update, int(round_config["cohort-size"]), noise_generator(device)
        )
        # Under DP the server learns nothing per client beyond the release, except in central
        # and distributed placement, where it is trusted with these diagnostics.
        metrics = {"num-examples": 1}
        if cfg.dp != "local":
            metrics |= {"train-loss": train_loss, "update-norm": report.norm,
                        "clipped": int(report.clipped)}
    else:
        metrics["train-loss"] = train_loss

    content = RecordDict({
        "update": ArrayRecord({k: v.cpu() for k, v in update.items()}),
        "metrics": MetricRecord(metrics),
    })
    if buffers:
        content["buffers"] = ArrayRecord({k: v.cpu() for k, v in buffers.items()})
    return Message(content=content, reply_to=msg)
