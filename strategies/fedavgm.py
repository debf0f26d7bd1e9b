"""FedAvgM: FedAvg with server momentum."""

from __future__ import annotations

from typing import Any

from plateau.config import RunConfig
from plateau.privacy import Tensors

from .base import PlateauStrategy


class FedAvgM(PlateauStrategy):
    """FedAvg with server momentum.

    Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification", arXiv:1909.06335 (2019).

    Clients run FedAvg's K SGD steps; the server keeps m_{t+1} = beta*m_t + mean(Delta) and moves
    to x_{t+1} = x_t + server_lr * m_{t+1} (``server-momentum``, ``server-lr``).
    """

    paper = "Hsu et al., arXiv:1909.06335"
    server_state = "x, m_t"

    state_attributes = ("momentum",)
    local_rule = "sgd"

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.momentum: Tensors = {}

    def apply_update(self, server_round: int, mean_update: Tensors) -> Tensors:
        """m <- beta*m + mean(Delta); x <- x + server_lr*m."""
        momentum = self.momentum or self.zeros()
        beta, lr = self.config.server_momentum, self.config.server_lr
        self.momentum = {k: beta * momentum[k] + mean_update[k] for k in self.parameter_names}
        return {k: self.current[k] + lr * self.momentum[k] for k in self.parameter_names}
