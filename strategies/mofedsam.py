"""MoFedSAM: local SAM with client-level momentum."""

from __future__ import annotations

from .fedcm import FedCM


class MoFedSAM(FedCM):
    """MoFedSAM.

    Qu, Li, Duan et al., "Generalized Federated Learning via Sharpness Aware Minimization",
    ICML 2022 (arXiv:2206.02618); rule: docs/algorithms.md §5.5.

    Clients step along alpha*g_SAM + (1-alpha)*c_t, g_SAM the gradient at y + rho*g/|g| on the
    same batch (two backprops); the server is FedCM's. With cm-alpha = 1 and sam-rho = 0 it is
    FedAvg.
    """

    paper = "Qu et al., ICML 2022"
    server_state = "x, c_t"

    local_rule = "mosam"
