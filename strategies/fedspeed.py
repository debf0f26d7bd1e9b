"""FedSpeed: a prox-corrected local SAM step, with FedDyn's server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from plateau.config import Params, RunConfig, key
from plateau.local import Grads, LocalTask, combine, run_steps, unit
from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, LocalRule, register

from .aggregation import Aggregate
from .base import PlateauStrategy
from .shared import DynamicRegulariser


@dataclass(frozen=True)
class FedSpeedParams(Params):
    """FedSpeed's merge weight, perturbation radius and prox strength (keys ``fedspeed-*``)."""

    prefix = "fedspeed"
    alpha: float = key(1.0, "fedspeed: weight of the gradient at the perturbed point in the "
                       "merged gradient (1-alpha)*g(y) + alpha*g(y + rho*g/|g|); 1 = the "
                       "FL-Simulator step.", min=0, max=1)
    rho: float = key(0.05, "fedspeed: perturbation radius of the merged gradient.", min=0)
    lambda_: float = key(10.0, "fedspeed: lambda of the prox-correction term "
                         "(1/lambda)*(y - x_t + H_i).", min=0, min_exclusive=True)


class FedSpeed(PlateauStrategy):
    """FedSpeed.

    Sun, Shen, Huang et al., "FedSpeed: Larger Local Interval, Less Communication Round, and
    Higher Generalization Accuracy", ICLR 2023 (arXiv:2302.10429); the update of
    ``woodenchild95/FL-Simulator`` (docs/algorithms.md §5.15).

    Clients keep H_i (their accumulated updates; the paper's prox-correction g_hat_i is
    -H_i/lambda) in ``Context.state``. Every step moves along
    clip((1-alpha)*g(y) + alpha*g(y + rho*g/|g|) + (1/lambda)*(H_i - x_t)) + (1/lambda + wd)*y
    (two backprops; as in FL-Simulator, whose SGD adds the y terms as weight decay after the
    clip); then
    H_i <- H_i + Delta_i and the client releases Delta_i alone. The server is FedDyn's:
    H <- H + (1/N) sum Delta_i, x_{t+1} = x_t + mean(Delta) + H. The paper's server averages
    x_hat_i = y_K + H_i over the cohort, which would release each client's accumulated state;
    FL-Simulator's form releases only Delta_i, so under DP only Delta_i is clipped and noised.
    """

    paper = "Sun et al., ICLR 2023"
    server_state = "x, H"
    client_state = "H_i"

    local_rule = "speed"

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.accumulated = DynamicRegulariser()

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """H <- H + (1/N) sum Delta_i;  x <- x + mean(Delta) + H."""
        return self.accumulated.step(aggregate, self.trainable())


def speed(task: LocalTask) -> Tensors:
    """The merged gradient with the prox correction; keeps H_i, releases Delta."""
    params = task.hparams(FedSpeedParams)
    accumulated, anchor = task.accumulated_anchor()

    def direction(x: torch.Tensor, y: torch.Tensor) -> Grads:
        g = task.gradients(x, y)
        ascent = unit(g) if params.rho > 0 else None
        sharp = g if ascent is None else task.gradients_at(
            [params.rho * a for a in ascent], x, y, record=False)
        merged = combine(g, sharp, weights=(1 - params.alpha, params.alpha))
        return task.clipped_with_pull(merged, anchor, 1 / params.lambda_)

    run_steps(task, direction)
    delta = task.delta()
    task.keep_state("accumulated", combine(accumulated, list(delta.values())))
    return delta


register(Algorithm("fedspeed", FedSpeed, rules={"speed": LocalRule(speed, 2)},
                   params=(FedSpeedParams,)))
