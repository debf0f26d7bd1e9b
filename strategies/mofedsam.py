"""MoFedSAM: local SAM with client-level momentum."""

from __future__ import annotations

from plateau.local import LocalTask, combine, run_steps, sam_gradient
from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, LocalRule, register

from .fedcm import CMParams, FedCM
from .fedsam import SAMParams


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


def mosam(task: LocalTask) -> Tensors:
    """alpha*clip(g_SAM) + (1-alpha)*c_t (two backprops); releases Delta."""
    alpha, rho = task.hparams(CMParams).alpha, task.hparams(SAMParams).rho
    direction = task.vector("direction")
    run_steps(task, lambda x, y: combine(task.stability_clip(sam_gradient(task, x, y, rho)),
                                         direction, weights=(alpha, 1 - alpha)))
    return task.delta()


register(Algorithm("mofedsam", MoFedSAM, rules={"mosam": LocalRule(mosam, 2)},
                   params=(CMParams, SAMParams)))
