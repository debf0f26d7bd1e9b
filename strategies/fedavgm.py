"""FedAvgM: FedAvg with server momentum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plateau.config import Params, RunConfig, key
from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, register

from .aggregation import Aggregate
from .base import PlateauStrategy
from .shared import Momentum


@dataclass(frozen=True)
class ServerMomentumParams(Params):
    """FedAvgM's server optimiser (keys ``server-momentum``, ``server-lr``)."""

    prefix = "server"
    momentum: float = key(0.9, "fedavgm: server momentum beta.", min=0, max=1,
                          max_exclusive=True)
    lr: float = key(1.0, "fedavgm: server learning rate.", min=0, min_exclusive=True)


class FedAvgM(PlateauStrategy):
    """FedAvg with server momentum.

    Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification", arXiv:1909.06335 (2019).

    Clients run FedAvg's K SGD steps; the server keeps m_{t+1} = beta*m_t + mean(Delta) and moves
    to x_{t+1} = x_t + server_lr * m_{t+1} (``server-momentum``, ``server-lr``).
    """

    paper = "Hsu et al., arXiv:1909.06335"
    server_state = "x, m_t"

    local_rule = "sgd"

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.hparams = config.hparams(ServerMomentumParams)
        self.momentum = Momentum()

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """m <- beta*m + mean(Delta); x <- x + server_lr*m."""
        momentum = self.momentum.step(self.hparams.momentum, aggregate.mean, self.trainable())
        return {k: self.current[k] + self.hparams.lr * momentum[k] for k in self.parameter_names}


register(Algorithm("fedavgm", FedAvgM, params=(ServerMomentumParams,)))
