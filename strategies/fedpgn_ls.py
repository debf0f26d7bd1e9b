"""DP-FedPGN-LS: DP-FedPGN with Laplacian smoothing of the noisy aggregate."""

from __future__ import annotations

from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, register

from .fedpgn import FedPGN, PGNParams
from .smoothing import SmoothingParams, laplacian_smooth


class FedPGNLS(FedPGN):
    """DP-FedPGN-LS.

    Liu, Tian, Shang et al., arXiv:2510.27504 (2025), with the implicit smoother of Liang et al.,
    "Exploring Private Federated Learning with Laplacian Smoothing" (arXiv:2005.00218).

    Identical clients; the server moves to x_{t+1} = x_t - (I - lambda*L)^-1 D, per parameter
    tensor on the flattened aggregate (lambda = ls-sigma; 0 is DP-FedPGN), while the global
    direction c_{t+1} = D / (K*lr_t) keeps the unsmoothed aggregate.
    """

    paper = "Liu et al., arXiv:2510.27504; smoother: Liang et al., arXiv:2005.00218"
    server_state = "x, c_t"

    def smooth(self, update: Tensors) -> Tensors:
        """Per-tensor implicit Laplacian smoothing."""
        sigma = self.config.hparams(SmoothingParams).sigma
        return {k: laplacian_smooth(v, sigma) for k, v in update.items()}


register(Algorithm("fedpgn-ls", FedPGNLS, params=(PGNParams, SmoothingParams)))
