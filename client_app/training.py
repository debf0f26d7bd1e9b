"""Local training: the batch stream and the local rules clients run for K steps.

Every rule takes K steps of ``y <- y - lr * (d + wd * y)`` where ``d`` is the rule's direction
(the stability clip ``grad-clip`` applies to the gradient part), and returns the vector the client
releases (before clipping and noise). Shifts such as SAM perturbations or Nesterov look-aheads act
on trainable parameters only and are undone exactly (restored from a copy, not subtracted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from plateau.config import RunConfig
from plateau.data import Tensors as DataTensors
from plateau.privacy import Tensors, flat_norm

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
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy

    def __post_init__(self) -> None:
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.start = [p.detach().clone() for p in self.params]
        self.losses: list[torch.Tensor] = []

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The K mini-batches of this round."""
        device = self.params[0].device
        for index in batch_indices(len(self.data), self.config.batch_size,
                                   self.config.local_steps, self.generator):
            index = index.to(device)
            yield self.data.x[index], self.data.y[index]

    def gradients(self, x: torch.Tensor, y: torch.Tensor, *, record: bool = True) -> Grads:
        """Gradient of the batch loss at the current parameters (one backprop)."""
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

    def step(self, direction: Grads) -> None:
        """y <- y - lr * (d + wd * y)."""
        wd = self.config.weight_decay
        with torch.no_grad():
            for p, d in zip(self.params, direction, strict=True):
                p.sub_(self.lr * (d + wd * p))

    def vector(self, name: str) -> Grads | None:
        """A broadcast vector aligned with the trainable parameters (None if absent)."""
        record = self.broadcast.get(name)
        if record is None:
            return None
        return [record[n].to(p.device, p.dtype) for n, p in self.named]

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


def sgd(task: LocalTask) -> Tensors:
    """FedAvg: K steps of SGD; releases Delta = y_K - x_t."""
    model = task.model
    model.train()
    for x, y in task.batches():
        task.step(task.stability_clip(task.gradients(x, y)))
    return task.delta()


def pgn_mix(task: LocalTask) -> Tensors:
    """DP-FedPGN: d = gamma*clip(g) + (1-gamma)*c_t; releases the private part
    R = (x_t - y_K) - (1-gamma)*K*lr*c_t (the public drift is removed before clipping)."""
    gamma = task.config.pgn_gamma
    direction = task.vector("direction")
    task.model.train()
    for x, y in task.batches():
        g = task.stability_clip(task.gradients(x, y))
        if direction is not None:
            g = [gamma * gi + (1 - gamma) * ci for gi, ci in zip(g, direction, strict=True)]
        else:
            g = [gamma * gi for gi in g]
        task.step(g)
    public = (1 - gamma) * task.config.local_steps * task.lr
    delta = task.delta()
    if direction is None:
        return {n: -d for n, d in delta.items()}
    return {n: -d - public * c for (n, d), c in zip(delta.items(), direction, strict=True)}


def pgn_perturb(task: LocalTask) -> Tensors:
    """DP-FedPGN, penalty form: d = (1-alpha)*g(y) + alpha*g(y + r*c_t/|c_t|) (two backprops);
    releases R = x_t - y_K (nothing public to remove)."""
    alpha, radius = task.config.pgn_alpha, task.config.pgn_radius
    direction = task.vector("direction")
    ascent = unit(direction) if direction is not None else None
    shift = [radius * a for a in ascent] if ascent is not None else None
    task.model.train()
    for x, y in task.batches():
        here = task.gradients(x, y)
        there = here if shift is None else task.gradients_at(shift, x, y, record=False)
        task.step(task.stability_clip(
            [(1 - alpha) * a + alpha * b for a, b in zip(here, there, strict=True)]))
    return {n: -d for n, d in task.delta().items()}


def nsam(task: LocalTask) -> Tensors:
    """FedNSAM: the gradient at y + gamma*m - rho*m/|m| (one backprop); releases Delta."""
    gamma, rho = task.config.nsam_gamma, task.config.nsam_rho
    momentum = task.vector("momentum")
    direction = unit(momentum) if momentum is not None else None
    shift = None
    if momentum is not None and direction is not None:
        shift = [gamma * m - rho * u for m, u in zip(momentum, direction, strict=True)]
    task.model.train()
    for x, y in task.batches():
        task.step(task.stability_clip(task.gradients_at(shift, x, y)))
    return task.delta()


def nsam_code(task: LocalTask) -> Tensors:
    """FedNSAM as the authors' code runs it: start at z_0 = x_t + gamma*m, then local SAM
    (gradient at z + rho*g/|g|, two backprops); releases Delta = z_K - z_0."""
    gamma, rho = task.config.nsam_gamma, task.config.nsam_rho
    momentum = task.vector("momentum")
    if momentum is not None:
        with torch.no_grad():
            for p, m in zip(task.params, momentum, strict=True):
                p.add_(gamma * m)
        task.start = [p.detach().clone() for p in task.params]
    task.model.train()
    for x, y in task.batches():
        g = task.gradients(x, y)
        ascent = unit(g)
        shift = [rho * a for a in ascent] if ascent is not None else None
        task.step(task.stability_clip(task.gradients_at(shift, x, y, record=False)))
    return task.delta()


@dataclass(frozen=True)
class LocalRule:
    """A client-side algorithm: its K-step loop and its cost in backprops per step."""

    run: Callable[[LocalTask], Tensors]
    backprops_per_step: int


LOCAL_RULES: dict[str, LocalRule] = {
    "sgd": LocalRule(sgd, 1),
    "pgn-mix": LocalRule(pgn_mix, 1),
    "pgn-perturb": LocalRule(pgn_perturb, 2),
    "nsam": LocalRule(nsam, 1),
    "nsam-code": LocalRule(nsam_code, 2),
}
