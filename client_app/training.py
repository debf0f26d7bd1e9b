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
from plateau.record_dp import RecordPrivatiser
from plateau.release import CONTROL_PREFIX, DUAL_PREFIX

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


def sgd(task: LocalTask) -> Tensors:
    """FedAvg: K steps of SGD; releases Delta = y_K - x_t."""
    run_steps(task, lambda x, y: task.stability_clip(task.gradients(x, y)))
    return task.delta()


def sam(task: LocalTask) -> Tensors:
    """FedSAM: the gradient at y + rho*g/|g| (two backprops); releases Delta."""
    rho = task.config.sam_rho
    run_steps(task, lambda x, y: task.stability_clip(sam_gradient(task, x, y, rho)))
    return task.delta()


def prox(task: LocalTask) -> Tensors:
    """FedACG: clip(g) + beta*(y - z_t), z_t the received look-ahead; releases y_K - z_t."""
    beta = task.config.acg_beta
    run_steps(task, lambda x, y: combine(task.stability_clip(task.gradients(x, y)),
                                         task.drift(task.start), weights=(1.0, beta)))
    return task.delta()


def cm(task: LocalTask) -> Tensors:
    """FedCM: alpha*clip(g) + (1-alpha)*c_t; releases the whole Delta."""
    alpha = task.config.cm_alpha
    direction = task.vector("direction")
    run_steps(task, lambda x, y: combine(task.stability_clip(task.gradients(x, y)), direction,
                                         weights=(alpha, 1 - alpha)))
    return task.delta()


def mosam(task: LocalTask) -> Tensors:
    """MoFedSAM: alpha*clip(g_SAM) + (1-alpha)*c_t (two backprops); releases Delta."""
    alpha, rho = task.config.cm_alpha, task.config.sam_rho
    direction = task.vector("direction")
    run_steps(task, lambda x, y: combine(task.stability_clip(sam_gradient(task, x, y, rho)),
                                         direction, weights=(alpha, 1 - alpha)))
    return task.delta()


def lesam(task: LocalTask) -> Tensors:
    """FedLESAM: the gradient at y + rho*c_t/|c_t| (one backprop); releases Delta."""
    direction = task.vector("direction")
    ascent = unit(direction) if direction is not None else None
    shift = [task.config.sam_rho * a for a in ascent] if ascent is not None else None
    run_steps(task, lambda x, y: task.stability_clip(task.gradients_at(shift, x, y)))
    return task.delta()


def _controlled(task: LocalTask, gradient: Callable[[torch.Tensor, torch.Tensor], Grads]
                ) -> Tensors:
    """SCAFFOLD's loop around any gradient: step along clip(g) - c_i + c, then
    c_i+ = c_i - c + (x_t - y_K)/(K lr); release (Delta_y, Delta_c) and keep c_i+."""
    control = task.vector("control") or task.zeros()
    own = task.own_state("control", task.zeros())
    correction = combine(control, own, weights=(1.0, -1.0))
    run_steps(task, lambda x, y: combine(task.stability_clip(gradient(x, y)), correction))
    delta = task.delta()
    per_step = task.config.local_steps * task.lr
    updated = [ci - c - d / per_step
               for ci, c, d in zip(own, control, delta.values(), strict=True)]
    task.keep_state("control", updated)
    change = {CONTROL_PREFIX + n: u - ci
              for n, u, ci in zip(delta, updated, own, strict=True)}
    return {**delta, **change}


def scaffold(task: LocalTask) -> Tensors:
    """SCAFFOLD option II (c_i in the node's state)."""
    return _controlled(task, task.gradients)


def gamma(task: LocalTask) -> Tensors:
    """FedGAMMA: SCAFFOLD's control variates around the SAM gradient."""
    rho = task.config.sam_rho
    return _controlled(task, lambda x, y: sam_gradient(task, x, y, rho))


def dyn(task: LocalTask) -> Tensors:
    """FedDyn: clip(g) + alpha*(y - x_t + H_i); then H_i <- H_i + Delta (H_i in the state)."""
    alpha = task.config.dyn_alpha
    accumulated = task.own_state("accumulated", task.zeros())
    anchor = [s - h for s, h in zip(task.start, accumulated, strict=True)]
    run_steps(task, lambda x, y: combine(task.stability_clip(task.gradients(x, y)),
                                         task.drift(anchor), weights=(1.0, alpha)))
    delta = task.delta()
    task.keep_state("accumulated", combine(accumulated, list(delta.values())))
    return delta


def smoo(task: LocalTask) -> Tensors:
    """FedSMOO: the corrected SAM perturbation and FedDyn's regulariser, the step
    y <- y - lr * clip(g(y + s) + lam*(y - x_t + H_i) + wd*y) as in FL-Simulator; releases
    (Delta, mu_i) and keeps H_i, mu_i in the state."""
    rho, lam = task.config.sam_rho, task.config.dyn_alpha
    perturbation = task.vector("perturbation") or task.zeros()
    dual = task.own_state("dual", task.zeros())
    accumulated = task.own_state("accumulated", task.zeros())
    anchor = [s - h for s, h in zip(task.start, accumulated, strict=True)]

    def direction(x: torch.Tensor, y: torch.Tensor) -> Grads:
        nonlocal dual
        g = task.gradients(x, y)
        corrected = combine(g, dual, perturbation, weights=(1.0, -1.0, -1.0))
        norm = flat_norm(dict(enumerate(corrected)))
        shift = [rho * c / (norm + 1e-7) for c in corrected]
        dual = combine(dual, shift, perturbation, weights=(1.0, 1.0, -1.0))
        sharp = task.gradients_at(shift, x, y, record=False)
        # the stability clip covers the whole step: SAM gradient, regulariser and weight decay
        decay = [task.config.weight_decay * p.detach() for p in task.params]
        return task.stability_clip(combine(sharp, task.drift(anchor), decay,
                                           weights=(1.0, lam, 1.0)))

    run_steps(task, direction, decay=False)
    delta = task.delta()
    task.keep_state("dual", dual)
    task.keep_state("accumulated", combine(accumulated, list(delta.values())))
    return {**delta, **{DUAL_PREFIX + n: m for n, m in zip(delta, dual, strict=True)}}


def blur(task: LocalTask) -> Tensors:
    """FedAvg-BLUR: clip(g) + alpha*(y - x_t) while |y - x_t| > C (a real gradient)."""
    alpha, bound = task.config.blur_alpha, task.config.clip_norm

    def direction(x: torch.Tensor, y: torch.Tensor) -> Grads:
        drift = task.drift(task.start)
        outside = flat_norm(dict(enumerate(drift))) > bound
        g = task.stability_clip(task.gradients(x, y))
        return combine(g, drift, weights=(1.0, alpha)) if outside else g

    run_steps(task, direction)
    return task.delta()


def pgn_mix(task: LocalTask) -> Tensors:
    """DP-FedPGN: d = gamma*clip(g) + (1-gamma)*c_t; releases the private part
    R = (x_t - y_K) - (1-gamma)*K*lr*c_t (the public drift is removed before clipping)."""
    gamma_ = task.config.pgn_gamma
    direction = task.vector("direction") or task.zeros()
    run_steps(task, lambda x, y: combine(task.stability_clip(task.gradients(x, y)), direction,
                                         weights=(gamma_, 1 - gamma_)))
    public = (1 - gamma_) * task.config.local_steps * task.lr
    return {n: -d - public * c
            for (n, d), c in zip(task.delta().items(), direction, strict=True)}


def pgn_perturb(task: LocalTask) -> Tensors:
    """DP-FedPGN, penalty form: d = (1-alpha)*g(y) + alpha*g(y + r*c_t/|c_t|) (two backprops);
    releases R = x_t - y_K (nothing public to remove)."""
    alpha, radius = task.config.pgn_alpha, task.config.pgn_radius
    direction = task.vector("direction")
    ascent = unit(direction) if direction is not None else None
    shift = [radius * a for a in ascent] if ascent is not None else None

    def mixed(x: torch.Tensor, y: torch.Tensor) -> Grads:
        here = task.gradients(x, y)
        there = here if shift is None else task.gradients_at(shift, x, y, record=False)
        return task.stability_clip(combine(here, there, weights=(1 - alpha, alpha)))

    run_steps(task, mixed)
    return {n: -d for n, d in task.delta().items()}


def nsam(task: LocalTask) -> Tensors:
    """FedNSAM: the gradient at y + gamma*m - rho*m/|m| (one backprop); releases Delta."""
    momentum = task.vector("momentum")
    direction = unit(momentum) if momentum is not None else None
    shift = None
    if momentum is not None and direction is not None:
        shift = combine(momentum, direction,
                        weights=(task.config.nsam_gamma, -task.config.nsam_rho))
    run_steps(task, lambda x, y: task.stability_clip(task.gradients_at(shift, x, y)))
    return task.delta()


def nsam_code(task: LocalTask) -> Tensors:
    """FedNSAM as the authors' code runs it: start at z_0 = x_t + gamma*m, then local SAM
    (two backprops); releases Delta = z_K - z_0."""
    momentum = task.vector("momentum")
    if momentum is not None:
        with torch.no_grad():
            for p, m in zip(task.params, momentum, strict=True):
                p.add_(task.config.nsam_gamma * m)
        task.start = [p.detach().clone() for p in task.params]
    rho = task.config.nsam_rho
    run_steps(task, lambda x, y: task.stability_clip(sam_gradient(task, x, y, rho)))
    return task.delta()


@dataclass(frozen=True)
class LocalRule:
    """A client-side algorithm: its K-step loop and its cost in backprops per step."""

    run: Callable[[LocalTask], Tensors]
    backprops_per_step: int


LOCAL_RULES: dict[str, LocalRule] = {
    "sgd": LocalRule(sgd, 1),
    "sam": LocalRule(sam, 2),
    "prox": LocalRule(prox, 1),
    "cm": LocalRule(cm, 1),
    "mosam": LocalRule(mosam, 2),
    "lesam": LocalRule(lesam, 1),
    "scaffold": LocalRule(scaffold, 1),
    "gamma": LocalRule(gamma, 2),
    "dyn": LocalRule(dyn, 1),
    "smoo": LocalRule(smoo, 2),
    "blur": LocalRule(blur, 1),
    "pgn-mix": LocalRule(pgn_mix, 1),
    "pgn-perturb": LocalRule(pgn_perturb, 2),
    "nsam": LocalRule(nsam, 1),
    "nsam-code": LocalRule(nsam_code, 2),
}
