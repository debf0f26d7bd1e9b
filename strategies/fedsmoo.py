"""FedSMOO: dynamic regulariser plus a SAM perturbation corrected towards a global one."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord

from plateau.config import RunConfig
from plateau.privacy import Tensors, flat_norm
from plateau.release import DUAL_PREFIX

from .shared import DynamicRegulariser


class FedSMOO(DynamicRegulariser):
    """FedSMOO.

    Sun, Shen, Chen et al., "Dynamic Regularized Sharpness Aware Minimization in Federated
    Learning: Approaching Global Consistency and Smooth Landscape", ICML 2023
    (arXiv:2305.11584); the rule of ``woodenchild95/FL-Simulator`` (docs/algorithms.md §5.10).

    Clients keep H_i and the perturbation dual mu_i in ``Context.state``. Per step:
    g_hat = g - mu_i - s_t, s_hat = rho*g_hat/(|g_hat| + 1e-7), mu_i <- mu_i + s_hat - s_t, and
    the step direction is g(y + s_hat) + lambda*(y - x_t + H_i). They release (Delta_i, mu_i),
    privatised together. Server: the FedDyn update, and the global perturbation
    s_{t+1} = rho*mean(mu)/(|mean(mu)| + 1e-7), broadcast as ``perturbation``.
    """

    paper = "Sun et al., ICML 2023"
    server_state = "x, H, s_t"
    client_state = "H_i, mu_i"

    local_rule = "smoo"
    state_attributes = ("accumulated", "perturbation")

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.perturbation: Tensors = {}

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """s_t as the ArrayRecord ``perturbation``."""
        if not self.perturbation:
            self.perturbation = self.zeros()
        return {"perturbation": self.as_record(self.perturbation)}

    def release_template(self) -> Tensors:
        """The model update and the dual mu_i, clipped and noised together."""
        params = super().release_template()
        return {**params, **{DUAL_PREFIX + k: v for k, v in params.items()}}

    def apply_update(self, server_round: int, mean_update: Tensors) -> Tensors:
        """FedDyn's model update; s_{t+1} = rho * mean(mu) / (|mean(mu)| + 1e-7)."""
        mean_dual = {k: mean_update[DUAL_PREFIX + k] for k in self.parameter_names}
        scale = self.config.sam_rho / (flat_norm(mean_dual) + 1e-7)
        self.perturbation = {k: scale * v for k, v in mean_dual.items()}
        return self.step_with_regulariser(mean_update)
