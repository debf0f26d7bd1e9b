"""FedSAM (with DP: DP-FedSAM): sharpness-aware local steps."""

from __future__ import annotations

from dataclasses import dataclass

from plateau.config import Params, key
from plateau.local import LocalTask, run_steps, sam_gradient
from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, LocalRule, register

from .fedavg import FedAvg


@dataclass(frozen=True)
class SAMParams(Params):
    """The SAM radius, shared by every algorithm with a local SAM step (key ``sam-rho``)."""

    prefix = "sam"
    rho: float = key(0.05, "fedsam, mofedsam, fedlesam, fedgamma, fedsmoo: SAM radius.", min=0)


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


def sam(task: LocalTask) -> Tensors:
    """The gradient at y + rho*g/|g| (two backprops); releases Delta."""
    rho = task.hparams(SAMParams).rho
    run_steps(task, lambda x, y: task.stability_clip(sam_gradient(task, x, y, rho)))
    return task.delta()


register(Algorithm("fedsam", FedSAM, rules={"sam": LocalRule(sam, 2)}, params=(SAMParams,)))
