"""FedACG: accelerated client gradient through a broadcast look-ahead and a proximal term."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord

from plateau.config import Params, RunConfig, key
from plateau.local import LocalTask, combine, run_steps
from plateau.messages import tensors_record
from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, LocalRule, register

from .aggregation import Aggregate
from .base import PlateauStrategy
from .shared import Momentum


@dataclass(frozen=True)
class ACGParams(Params):
    """FedACG's look-ahead and proximal weight (keys ``acg-lambda``, ``acg-beta``)."""

    prefix = "acg"
    lambda_: float = key(0.85, "fedacg: momentum / look-ahead coefficient lambda.", min=0, max=1,
                         max_exclusive=True)
    beta: float = key(0.01, "fedacg: weight beta of the proximal term (beta/2)|y - z_t|^2.",
                      min=0)


class FedACG(PlateauStrategy):
    """FedACG.

    Kim, Kim and Han, "Communication-Efficient Federated Learning with Accelerated Client
    Gradient", CVPR 2024 (arXiv:2201.03172); rule: docs/algorithms.md §5.3.

    The server broadcasts one model, the look-ahead z_t = x_t + lambda*m_t. Clients start there
    and minimise loss + (beta/2)|y - z_t|^2 (a real gradient, beta*(y - z_t)), releasing
    Delta_i = y_K - z_t. Server: m_{t+1} = lambda*m_t + mean(Delta), x_{t+1} = x_t + m_{t+1}
    (= z_t + mean(Delta)). With lambda = beta = 0 it is FedAvg.
    """

    paper = "Kim et al., CVPR 2024"
    server_state = "x, m_t"

    local_rule = "prox"

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.hparams = config.hparams(ACGParams)
        self.momentum = Momentum()

    def broadcast_model(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """z_t = x_t + lambda*m_t (buffers unchanged)."""
        momentum = self.momentum.value
        if not momentum:
            return arrays
        lam = self.hparams.lambda_
        ahead = {k: v + lam * momentum[k] if k in momentum else v
                 for k, v in self.current.items()}
        return tensors_record(ahead)

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """m <- lambda*m + mean(Delta); x <- x + m."""
        momentum = self.momentum.step(self.hparams.lambda_, aggregate.mean, self.trainable())
        return {k: self.current[k] + momentum[k] for k in self.parameter_names}


def prox(task: LocalTask) -> Tensors:
    """clip(g) + beta*(y - z_t), z_t the received look-ahead; releases y_K - z_t."""
    beta = task.hparams(ACGParams).beta
    run_steps(task, lambda x, y: combine(task.stability_clip(task.gradients(x, y)),
                                         task.drift(task.start), weights=(1.0, beta)))
    return task.delta()


register(Algorithm("fedacg", FedACG, rules={"prox": LocalRule(prox, 1)}, params=(ACGParams,)))
