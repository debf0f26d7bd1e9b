"""The client-round harness every local rule is written against: the batch stream, gradients at
shifted points, steps, broadcast and node-state vectors.

The rules themselves live with their algorithms (``strategies/<algorithm>.py``). Every rule takes
K steps of ``y <- y - lr * (d + wd * y)`` where ``d`` is the rule's direction (the stability clip
``grad-clip`` applies to the gradient part), and returns the vector the client releases (before
clipping and noise). Shifts such as SAM perturbations or Nesterov look-aheads act on trainable
parameters only and are undone exactly (restored from a copy, not subtracted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from plateau.config import P, RunConfig
from plateau.data import Tensors as DataTensors
from plateau.privacy.mechanism import Tensors, flat_norm
from plateau.privacy.record_dp import RecordPrivatiser

Grads = list[torch.Tensor]


@dataclass
class LocalTask:
    """Everything one client's K local steps need."""

    model: nn.Module
    data: DataTensors
    config: RunConfig
    lr: float
    generator: torch.Generator
    broadcast: dict[str, Tensors] = field(default_factory=dict)
    state: dict[str, Tensors] = field(default_factory=dict)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    # record-level DP: Poisson-sampled batches and noisy clipped gradients (None: plain SGD)
    record: RecordPrivatiser | None = None

    def __post_init__(self) -> None:
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.start = [p.detach().clone() for p in self.params]
        self.losses: list[torch.Tensor] = []

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The K mini-batches of this round."""
        if self.record is not None:
            yield from self.record.batches(self.data.x, self.data.y, self.config.local_steps)
            return
        device = self.params[0].device
        for index in batch_indices(len(self.data), self.config.batch_size,
                                   self.config.local_steps, self.generator):
            index = index.to(device)
            yield self.data.x[index], self.data.y[index]

    def gradients(self, x: torch.Tensor, y: torch.Tensor, *, record: bool = True) -> Grads:
        """Gradient of the batch loss at the current parameters (one backprop); under
        record-level DP, the noisy mean of the batch's clipped per-record gradients."""
        if self.record is not None:
            grads, mean_loss = self.record.gradients(self.params, x, y)
            if record and mean_loss is not None:
                self.losses.append(mean_loss)
            return grads
        loss = self.loss_fn(self.model(x), y)
        if record:
            self.losses.append(loss.detach())
        return list(torch.autograd.grad(loss, self.params))

    def gradients_at(self, shift: Grads | None, x: torch.Tensor, y: torch.Tensor, *,
                     record: bool = True) -> Grads:
        """Gradient at the parameters moved by ``shift``; the parameters are restored exactly."""
        if shift is None:
            return self.gradients(x, y, record=record)
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, shift, strict=True):
                p.add_(s)
        try:
            return self.gradients(x, y, record=record)
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)

    def stability_clip(self, grads: Grads) -> Grads:
        """Scale a direction to norm <= grad-clip (training stability, not DP)."""
        if self.config.grad_clip <= 0:
            return grads
        norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])))
        scale = min(1.0, self.config.grad_clip / (norm + 1e-12))
        return grads if scale >= 1.0 else [g * scale for g in grads]

    def step(self, direction: Grads, *, decay: bool = True) -> None:
        """y <- y - lr * (d + wd * y); ``decay=False`` when d already holds the decay term."""
        wd = self.config.weight_decay if decay else 0.0
        with torch.no_grad():
            for p, d in zip(self.params, direction, strict=True):
                p.sub_(self.lr * (d + wd * p))

    def vector(self, name: str) -> Grads | None:
        """A broadcast vector aligned with the trainable parameters (None if absent)."""
        record = self.broadcast.get(name)
        if record is None:
            return None
        return [record[n].to(p.device, p.dtype) for n, p in self.named]

    def clipped_with_pull(self, gradient: Grads, anchor: Grads, strength: float) -> Grads:
        """gradient + strength * (y - anchor) as FL-Simulator steps it (FedDyn-style
        regularisers): the stability clip covers the gradient and the pull -strength * anchor,
        and strength * y is added after it (that code's SGD weight_decay)."""
        pulled = self.stability_clip(combine(gradient, anchor, weights=(1.0, -strength)))
        return combine(pulled, [p.detach() for p in self.params], weights=(1.0, strength))

    def zeros(self) -> Grads:
        """A zero vector aligned with the trainable parameters."""
        return [torch.zeros_like(p) for p in self.params]

    def drift(self, anchor: Grads) -> Grads:
        """y - anchor, per trainable parameter (the gradient of |y - anchor|^2 / 2)."""
        return [p.detach() - a for p, a in zip(self.params, anchor, strict=True)]

    def own_state(self, name: str, default: Grads) -> Grads:
        """This node's persistent vector ``name`` (from Context.state), aligned."""
        stored = self.state.get(name)
        if stored is None:
            return default
        return [stored[n].to(p.device, p.dtype) for n, p in self.named]

    def keep_state(self, name: str, vector: Grads) -> None:
        """Store a vector in this node's persistent state for the next round."""
        self.state[name] = {n: v.detach() for (n, _), v in zip(self.named, vector, strict=True)}

    def accumulated_anchor(self) -> tuple[Grads, Grads]:
        """FedDyn's node state H_i (zeros at first) and the anchor x_t - H_i it pulls towards."""
        accumulated = self.own_state("accumulated", self.zeros())
        return accumulated, [s - h for s, h in zip(self.start, accumulated, strict=True)]

    def hparams(self, kind: type[P]) -> P:
        """The algorithm's typed hyper-parameters of this round."""
        return self.config.hparams(kind)

    def delta(self) -> Tensors:
        """y_K - start, per trainable parameter."""
        return {n: p.detach() - s for (n, p), s in zip(self.named, self.start, strict=True)}

    def mean_loss(self) -> float:
        return float(torch.stack(self.losses).mean()) if self.losses else float("nan")


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


def unit(vector: Grads) -> Grads | None:
    """v / ||v|| with one global L2 norm, or None for the zero vector."""
    norm = flat_norm(dict(enumerate(vector)))
    return None if norm == 0 else [v / norm for v in vector]


def combine(*terms: Grads | None, weights: tuple[float, ...] | None = None) -> Grads:
    """Weighted sum of aligned vectors, skipping absent (None) terms."""
    weights = weights or (1.0,) * len(terms)
    present = [(w, t) for w, t in zip(weights, terms, strict=True) if t is not None]
    return [sum(w * t[i] for w, t in present) for i in range(len(present[0][1]))]


def run_steps(task: LocalTask, direction: Callable[[torch.Tensor, torch.Tensor], Grads], *,
              decay: bool = True) -> None:
    """K steps y <- y - lr * (direction(batch) + wd * y), in training mode (without the wd
    term when ``decay`` is False: the direction then carries it)."""
    task.model.train()
    for x, y in task.batches():
        task.step(direction(x, y), decay=decay)


def sam_gradient(task: LocalTask, x: torch.Tensor, y: torch.Tensor, rho: float) -> Grads:
    """Gradient at y + rho*g/|g| on the same batch (two backprops; rho = 0: one)."""
    g = task.gradients(x, y)
    ascent = unit(g) if rho > 0 else None
    if ascent is None:
        return g
    return task.gradients_at([rho * a for a in ascent], x, y, record=False)
