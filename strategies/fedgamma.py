"""FedGAMMA: SAM with SCAFFOLD's control variates."""

from __future__ import annotations

from plateau.local import LocalTask, sam_gradient
from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, LocalRule, register

from .fedsam import SAMParams
from .scaffold import Scaffold, controlled


class FedGAMMA(Scaffold):
    """FedGAMMA.

    Dai, Chen, Zhou et al., "FedGAMMA: Federated Learning with Global Sharpness-Aware
    Minimization", IEEE TNNLS 2023; rule: docs/algorithms.md §5.8.

    Each local step uses the SAM gradient at y + rho*g/|g| corrected by the control variates,
    g_SAM - c_i + c (two backprops); control variates and server as SCAFFOLD. With sam-rho = 0 it
    is SCAFFOLD.
    """

    paper = "Dai et al., IEEE TNNLS 2023"
    server_state = "x, c"
    client_state = "c_i"

    local_rule = "gamma"


def gamma(task: LocalTask) -> Tensors:
    """SCAFFOLD's control variates around the SAM gradient."""
    rho = task.hparams(SAMParams).rho
    return controlled(task, lambda x, y: sam_gradient(task, x, y, rho))


register(Algorithm("fedgamma", FedGAMMA, rules={"gamma": LocalRule(gamma, 2)},
                   params=(SAMParams,)))
