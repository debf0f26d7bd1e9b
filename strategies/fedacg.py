"""FedACG: accelerated client gradient through a broadcast look-ahead and a proximal term."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord

from plateau.config import RunConfig
from plateau.privacy import Tensors

from .base import PlateauStrategy


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

    state_attributes = ("momentum",)
    local_rule = "prox"

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.momentum: Tensors = {}

    def broadcast_model(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """z_t = x_t + lambda*m_t (buffers unchanged)."""
        if not self.momentum:
            return arrays
        lam = self.config.acg_lambda
        ahead = {k: v + lam * self.momentum[k] if k in self.momentum else v
                 for k, v in self.current.items()}
        return self.as_record(ahead)

    def apply_update(self, server_round: int, mean_update: Tensors) -> Tensors:
        """m <- lambda*m + mean(Delta); x <- x + m."""
        momentum = self.momentum or self.zeros()
        lam = self.config.acg_lambda
        self.momentum = {k: lam * momentum[k] + mean_update[k] for k in self.parameter_names}
        return {k: self.current[k] + self.momentum[k] for k in self.parameter_names}
