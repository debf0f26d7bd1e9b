"""SCAFFOLD: control variates against client drift."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord

from plateau.config import RunConfig
from plateau.local import Grads, LocalTask, combine, run_steps
from plateau.privacy.mechanism import Tensors
from plateau.privacy.release import CONTROL_PREFIX
from strategies.registry import Algorithm, LocalRule, register

from .aggregation import Aggregate
from .base import PlateauStrategy
from .shared import ControlVariate


class Scaffold(PlateauStrategy):
    """SCAFFOLD (option II).

    Karimireddy, Kale, Mohri et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", ICML 2020 (arXiv:1910.06378); rule: docs/algorithms.md §5.7.

    Clients keep c_i in their ``Context.state`` and step along g - c_i + c; then
    c_i+ = c_i - c + (x_t - y_K)/(K*lr_t) and they release (Delta_y, Delta_c = c_i+ - c_i),
    clipped and noised together under DP. Server: x_{t+1} = x_t + mean(Delta_y),
    c <- c + (1/N) sum Delta_c. The first round (c = c_i = 0) is a FedAvg round.
    """

    paper = "Karimireddy et al., ICML 2020"
    server_state = "x, c"
    client_state = "c_i"

    local_rule = "scaffold"

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.control = ControlVariate(CONTROL_PREFIX)

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """c as the ArrayRecord ``control``."""
        return {"control": self.control.record(self.trainable())}

    def release_template(self) -> Tensors:
        """The model update and the control-variate change, clipped and noised together."""
        params = self.trainable()
        return {**params, **self.control.uploads(params)}

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """x <- x + mean(Delta_y); c <- c + (1/N) sum(Delta_c)."""
        self.control.update(aggregate, self.trainable())
        return {k: self.current[k] + aggregate.mean[k] for k in self.parameter_names}


def controlled(task: LocalTask, gradient: Callable[[torch.Tensor, torch.Tensor], Grads]
               ) -> Tensors:
    """SCAFFOLD's loop around any gradient: step along clip(g) - c_i + c, then
    c_i+ = c_i - c + (x_t - y_K)/(K lr); release (Delta_y, Delta_c) and keep c_i+."""
    control, own = control_pair(task)
    correction = combine(control, own, weights=(1.0, -1.0))
    run_steps(task, lambda x, y: combine(task.stability_clip(gradient(x, y)), correction))
    return control_release(task, control, own)


def control_pair(task: LocalTask) -> tuple[Grads, Grads]:
    """(c, c_i): the broadcast control variate and this node's own (zeros before any)."""
    return task.vector("control") or task.zeros(), task.own_state("control", task.zeros())


def control_release(task: LocalTask, control: Grads, own: Grads) -> Tensors:
    """After the K steps: c_i+ = c_i - c + (x_t - y_K)/(K lr), kept in the node's state; the
    release is (Delta_y, Delta_c = c_i+ - c_i)."""
    delta = task.delta()
    per_step = task.config.local_steps * task.lr
    updated = [ci - c - d / per_step
               for ci, c, d in zip(own, control, delta.values(), strict=True)]
    task.keep_state("control", updated)
    change = {CONTROL_PREFIX + n: u - ci
              for n, u, ci in zip(delta, updated, own, strict=True)}
    return {**delta, **change}


def scaffold(task: LocalTask) -> Tensors:
    """Option II (c_i in the node's state)."""
    return controlled(task, task.gradients)


register(Algorithm("scaffold", Scaffold, rules={"scaffold": LocalRule(scaffold, 1)}))
