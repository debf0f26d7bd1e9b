"""DP-FedAvg-LS: DP-FedAvg with Laplacian smoothing of the noisy aggregate."""

from __future__ import annotations

from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, register

from .aggregation import Aggregate
from .base import PlateauStrategy
from .smoothing import SmoothingParams, laplacian_smooth


class FedAvgLS(PlateauStrategy):
    """DP-FedAvg-LS.

    Liang, Shen, Liu et al., "Exploring Private Federated Learning with Laplacian Smoothing",
    arXiv:2005.00218 (2020).

    FedAvg clients; the server moves to x_{t+1} = x_t + (I - lambda*L)^-1 mean(Delta), per
    tensor (the smoother shared with fedpgn-ls; lambda = ls-sigma, 0 is FedAvg).
    """

    paper = "Liang et al., arXiv:2005.00218"
    server_state = "x"

    local_rule = "sgd"

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """x <- x + LS(mean(Delta))."""
        sigma = self.config.hparams(SmoothingParams).sigma
        return {k: self.current[k] + laplacian_smooth(aggregate.mean[k], sigma)
                for k in self.parameter_names}


register(Algorithm("fedavg-ls", FedAvgLS, params=(SmoothingParams,)))
