"""FedNSAM: global Nesterov momentum for the SAM perturbation and for extrapolation."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord

from plateau.config import RunConfig
from plateau.privacy import Tensors

from .base import PlateauStrategy


class FedNSAM(PlateauStrategy):
    """FedNSAM.

    Liu, Shang, Tian et al., "FedNSAM: Consistency of Local and Global Flatness for Federated
    Learning", ACM MM 2025 (doi:10.1145/3746027.3755226; arXiv:2602.23827); the reconstructed
    paper form of the implementation spec (docs/algorithms.md §4).

    The server keeps the momentum m_t (descent direction, m_0 = 0) and broadcasts it. Clients take
    K steps with the gradient evaluated at y + gamma*m_t - rho*m_t/|m_t| (one backprop; with
    m = 0 plain SGD) and release Delta_i = y_K - x_t. Server: m_{t+1} = gamma*m_t + mean(Delta),
    x_{t+1} = x_t + m_{t+1}. With nsam-form='code' clients run local SAM from the look-ahead
    start x_t + gamma*m_t instead (the authors' current code), with the same, correctly
    accumulated, server momentum. The momentum is post-processing of the privatised mean, so it
    composes with every DP placement.
    """

    paper = "Liu, Shang, Tian et al., ACM MM 2025"
    server_state = "x, m_t"

    state_attributes = ("momentum",)

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.momentum: Tensors = {}

    @property
    def local_rule(self) -> str:  # type: ignore[override]
        """'nsam' (paper) or 'nsam-code'."""
        return "nsam" if self.config.nsam_form == "paper" else "nsam-code"

    def global_momentum(self) -> Tensors:
        """m_t (zeros before the first update)."""
        if not self.momentum:
            self.momentum = self.zeros()
        return self.momentum

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """m_t as the second ArrayRecord, ``momentum``."""
        return {"momentum": self.as_record(self.global_momentum())}

    def apply_update(self, server_round: int, mean_update: Tensors) -> Tensors:
        """m_{t+1} = gamma*m_t + mean(Delta); x_{t+1} = x_t + m_{t+1}."""
        gamma = self.config.nsam_gamma
        momentum = self.global_momentum()
        self.momentum = {k: gamma * momentum[k] + mean_update[k] for k in self.parameter_names}
        return {k: self.current[k] + self.momentum[k] for k in self.parameter_names}
