"""FedAvg-BLUR: a regulariser that keeps local updates inside the clipping bound."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plateau.config import Params, key
from plateau.local import Grads, LocalTask, combine, run_steps
from plateau.privacy.mechanism import Tensors, flat_norm
from strategies.registry import Algorithm, LocalRule, register

from .fedavg import FedAvg


@dataclass(frozen=True)
class BlurParams(Params):
    """Weight of the bounded-update regulariser (key ``blur-alpha``)."""

    prefix = "blur"
    alpha: float = key(0.4, "fedavg-blur: weight of the bounded-update regulariser "
                       "(alpha/2)*max(0, |y - x|^2 - clip-norm^2).", min=0)


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


def blur(task: LocalTask) -> Tensors:
    """clip(g) + alpha*(y - x_t) while |y - x_t| > C (a real gradient)."""
    alpha, bound = task.hparams(BlurParams).alpha, task.config.clip_norm

    def direction(x: torch.Tensor, y: torch.Tensor) -> Grads:
        drift = task.drift(task.start)
        outside = flat_norm(dict(enumerate(drift))) > bound
        g = task.stability_clip(task.gradients(x, y))
        return combine(g, drift, weights=(1.0, alpha)) if outside else g

    run_steps(task, direction)
    return task.delta()


register(Algorithm("fedavg-blur", FedAvgBLUR, rules={"blur": LocalRule(blur, 1)},
                   params=(BlurParams,)))
