"""SCAFFOLD: control variates against client drift."""

from __future__ import annotations

from plateau.privacy import Tensors

from .shared import ServerControlVariate


class Scaffold(ServerControlVariate):
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

    def apply_update(self, server_round: int, mean_update: Tensors) -> Tensors:
        """x <- x + mean(Delta_y); c <- c + (1/N) sum(Delta_c)."""
        self.update_control(mean_update)
        return {k: self.current[k] + mean_update[k] for k in self.parameter_names}
