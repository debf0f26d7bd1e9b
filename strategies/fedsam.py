"""FedSAM (with DP: DP-FedSAM): sharpness-aware local steps."""

from __future__ import annotations

from .fedavg import FedAvg


class FedSAM(FedAvg):
    """FedSAM; with client-level DP it is DP-FedSAM.

    Qu, Li, Duan et al., ICML 2022 (arXiv:2206.02618); Caldarola, Caputo and Ciccone, ECCV 2022
    (arXiv:2203.11834); DP-FedSAM: Shi, Shen, Wang et al., CVPR 2023 (arXiv:2303.11242).

    Each local step uses the gradient at y + rho*g/|g| (the same batch, two backprops); the server
    is FedAvg's. With sam-rho = 0 it is FedAvg.
    """

    paper = "Qu et al., ICML 2022; Caldarola et al., ECCV 2022; DP-FedSAM: Shi et al., CVPR 2023"
    server_state = "x"

    local_rule = "sam"
