"""FedLESAM: a SAM perturbation estimated from the last global update (one backprop)."""

from __future__ import annotations

from plateau.local import LocalTask, run_steps, unit
from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, LocalRule, register

from .fedcm import FedCM
from .fedsam import SAMParams


class FedLESAM(FedCM):
    """FedLESAM.

    Fan, Zhou, Wang et al., "Locally Estimated Global Perturbations are Better than Local
    Perturbations for Federated Sharpness-aware Minimization", ICML 2024 (arXiv:2405.18890);
    rule: docs/algorithms.md §5.6.

    The ascent direction is the last global update, broadcast as c_t (the gradient direction,
    normalised with one global L2 norm, not the official code's sum of per-tensor norms): each
    step uses the gradient at y + rho*c_t/|c_t| (one backprop; round 1, c = 0: plain SGD). The
    server is FedAvg's, remembering its step for the next round.
    """

    paper = "Fan et al., ICML 2024"
    server_state = "x, c_t"

    local_rule = "lesam"


def lesam(task: LocalTask) -> Tensors:
    """The gradient at y + rho*c_t/|c_t| (one backprop); releases Delta."""
    rho = task.hparams(SAMParams).rho
    direction = task.vector("direction")
    ascent = unit(direction) if direction is not None else None
    shift = [rho * a for a in ascent] if ascent is not None else None
    run_steps(task, lambda x, y: task.stability_clip(task.gradients_at(shift, x, y)))
    return task.delta()


register(Algorithm("fedlesam", FedLESAM, rules={"lesam": LocalRule(lesam, 1)},
                   params=(SAMParams,)))
