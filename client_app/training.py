"""Local training: the batch stream and the local rules clients run for K steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from plateau.config import RunConfig
from plateau.data import Tensors as DataTensors
from plateau.privacy import Tensors


@dataclass
class LocalTask:
    """Everything one client's K local steps need."""

    model: nn.Module
    data: DataTensors
    config: RunConfig
    lr: float
    generator: torch.Generator
    broadcast: dict[str, Tensors] = field(default_factory=dict)


def batch_indices(
    num_examples: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """``steps`` mini-batches drawn epoch by epoch without replacement (no partial batches)."""
    size = min(batch_size, num_examples)
    order = torch.randperm(num_examples, generator=generator)
    position = 0
    for _ in range(steps):
        if position + size > num_examples:
            order, position = torch.randperm(num_examples, generator=generator), 0
        yield order[position : position + size]
        position += size


def sgd(task: LocalTask) -> float:
    """K steps of y <- y - lr * (clip(g) + wd * y); returns the mean training loss.

    The gradient clip (``grad-clip``) is for stability only; the DP bound comes from clipping the
    released update afterwards.
    """
    cfg = task.config
    model = task.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=task.lr, weight_decay=cfg.weight_decay)
    device = next(model.parameters()).device
    losses = []
    for index in batch_indices(len(task.data), cfg.batch_size, cfg.local_steps, task.generator):
        index = index.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(task.data.x[index]), task.data.y[index])
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append(loss.detach())
    return float(torch.stack(losses).mean())


LOCAL_RULES: dict[str, Callable[[LocalTask], float]] = {
    "sgd": sgd,
}
