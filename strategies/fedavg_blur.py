"""FedAvg-BLUR: a regulariser that keeps local updates inside the clipping bound."""

from __future__ import annotations

from .fedavg import FedAvg


class FedAvgBLUR(FedAvg):
    """FedAvg-BLUR (bounded local update regulariser; LUS sparsification not included).

    Cheng, Zhang, Xu et al., "Differentially Private Federated Learning with Local
    Regularization and Sparsification", CVPR 2022 (arXiv:2203.03106).

    Clients minimise loss + (alpha/2)*max(0, |y - x_t|^2 - C^2) with C = clip-norm, whose real
    gradient alpha*(y - x_t) acts once the update leaves the clipping ball (the authors' code
    computes it with .item() and so passes no gradient). Server: FedAvg. With blur-alpha = 0 it
    is FedAvg.
    """

    paper = "Cheng et al., CVPR 2022"
    server_state = "x"

    local_rule = "blur"
