"""FedCM: client-level momentum with the last global update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord

from plateau.config import Params, RunConfig, key
from plateau.local import LocalTask, combine, run_steps
from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, LocalRule, register

from .aggregation import Aggregate
from .base import PlateauStrategy
from .shared import GlobalDirection


@dataclass(frozen=True)
class CMParams(Params):
    """Weight of the local gradient against the global direction (key ``cm-alpha``)."""

    prefix = "cm"
    alpha: float = key(0.1, "fedcm, mofedsam: weight of the local gradient; 1 - cm-alpha goes "
                       "to the last global update.", min=0, max=1)


class FedCM(PlateauStrategy):
    """FedCM.

    Xu, Wang, Wang et al., "FedCM: Federated Learning with Client-level Momentum",
    arXiv:2106.10874 (2021); rule: docs/algorithms.md §5.4.

    Clients step along alpha*g + (1-alpha)*c_t, where c_t is the last global update per local
    step (``cm-alpha``), and release Delta_i = y_K - x_t (the whole movement: unlike DP-FedPGN
    nothing public is removed before clipping). Server: x_{t+1} = x_t + mean(Delta),
    c_{t+1} = -mean(Delta)/(K*lr_t). With cm-alpha = 1 it is FedAvg.
    """

    paper = "Xu et al., arXiv:2106.10874"
    server_state = "x, c_t"

    local_rule = "cm"

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.direction = GlobalDirection(config)

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """c_t as the ArrayRecord ``direction``."""
        return {"direction": self.direction.record(self.trainable())}

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """x <- x + mean(Delta); c <- -mean(Delta)/(K lr)."""
        self.direction.remember({k: -aggregate.mean[k] for k in self.parameter_names},
                                self.step_scale(server_round), aggregate)
        return {k: self.current[k] + aggregate.mean[k] for k in self.parameter_names}


def cm(task: LocalTask) -> Tensors:
    """alpha*clip(g) + (1-alpha)*c_t; releases the whole Delta."""
    alpha = task.hparams(CMParams).alpha
    direction = task.vector("direction")
    run_steps(task, lambda x, y: combine(task.stability_clip(task.gradients(x, y)), direction,
                                         weights=(alpha, 1 - alpha)))
    return task.delta()


register(Algorithm("fedcm", FedCM, rules={"cm": LocalRule(cm, 1)}, params=(CMParams,)))
