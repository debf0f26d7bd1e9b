"""FedDyn: the dynamic regulariser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plateau.config import Params, RunConfig, key
from plateau.local import LocalTask, combine, run_steps
from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, LocalRule, register

from .aggregation import Aggregate
from .base import PlateauStrategy
from .shared import DynamicRegulariser


@dataclass(frozen=True)
class DynParams(Params):
    """Weight of FedDyn's dynamic regulariser (key ``dyn-alpha``)."""

    prefix = "dyn"
    alpha: float = key(0.01, "feddyn, fedsmoo: weight of the dynamic regulariser.", min=0)


class FedDyn(PlateauStrategy):
    """FedDyn.

    Acar, Zhao, Matas et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021
    (arXiv:2111.04263); rule: docs/algorithms.md §5.9, accumulated-update form.

    Clients keep H_i (their accumulated updates, -h_i/alpha) in ``Context.state`` and minimise
    loss + alpha*<H_i - x_t, y> + (alpha/2)|y|^2 around x_t, i.e. step along
    g + alpha*(y - x_t + H_i); then H_i <- H_i + Delta_i. Server:
    H <- H + (1/N) sum Delta_i, x_{t+1} = x_t + mean(Delta) + H.
    """

    paper = "Acar et al., ICLR 2021"
    server_state = "x, H"
    client_state = "H_i"

    local_rule = "dyn"

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.accumulated = DynamicRegulariser()

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """H <- H + (1/N) sum Delta_i;  x <- x + mean(Delta) + H."""
        return self.accumulated.step(aggregate, self.trainable())


def dyn(task: LocalTask) -> Tensors:
    """clip(g) + alpha*(y - x_t + H_i); then H_i <- H_i + Delta (H_i in the state)."""
    alpha = task.hparams(DynParams).alpha
    accumulated, anchor = task.accumulated_anchor()
    run_steps(task, lambda x, y: combine(task.stability_clip(task.gradients(x, y)),
                                         task.drift(anchor), weights=(1.0, alpha)))
    delta = task.delta()
    task.keep_state("accumulated", combine(accumulated, list(delta.values())))
    return delta


register(Algorithm("feddyn", FedDyn, rules={"dyn": LocalRule(dyn, 1)}, params=(DynParams,)))
