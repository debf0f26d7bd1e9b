"""FedCM: client-level momentum with the last global update."""

from __future__ import annotations

from plateau.privacy import Tensors

from .shared import GlobalDirection


class FedCM(GlobalDirection):
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

    def apply_update(self, server_round: int, mean_update: Tensors) -> Tensors:
        """x <- x + mean(Delta); c <- -mean(Delta)/(K lr)."""
        self.remember_step(server_round, {k: -mean_update[k] for k in self.parameter_names})
        return {k: self.current[k] + mean_update[k] for k in self.parameter_names}
