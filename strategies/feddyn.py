"""FedDyn: the dynamic regulariser."""

from __future__ import annotations

from plateau.privacy import Tensors

from .shared import DynamicRegulariser


class FedDyn(DynamicRegulariser):
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

    def apply_update(self, server_round: int, mean_update: Tensors) -> Tensors:
        """x_{t+1} = mean(y) + H."""
        return self.step_with_regulariser(mean_update)
