"""FedNSAM: global Nesterov momentum for the SAM perturbation and for extrapolation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord

from plateau.config import Params, RunConfig, key
from plateau.local import LocalTask, combine, run_steps, sam_gradient, unit
from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, LocalRule, register

from .aggregation import Aggregate
from .base import PlateauStrategy
from .shared import Momentum


@dataclass(frozen=True)
class NSAMParams(Params):
    """FedNSAM's momentum, radius and client form (keys ``nsam-*``)."""

    prefix = "nsam"
    gamma: float = key(0.85, "FedNSAM: server momentum / Nesterov extrapolation coefficient.",
                       min=0, max=1, max_exclusive=True)
    rho: float = key(0.05, "FedNSAM: SAM radius along the global momentum.", min=0)
    form: str = key(
        "paper", "FedNSAM client: 'paper' = gradient at y + gamma*m - rho*m/|m| (1 backprop); "
        "'code' = local SAM from the look-ahead start x + gamma*m (2 backprops), as the authors' "
        "code, with correct momentum.", choices=("paper", "code"))


class FedNSAM(PlateauStrategy):
    """FedNSAM.

    Liu, Shang, Tian et al., "FedNSAM: Consistency of Local and Global Flatness for Federated
    Learning", ACM MM 2025 (doi:10.1145/3746027.3755226; arXiv:2602.23827); the reconstructed
    paper form of the implementation spec (docs/algorithms.md §4).

    The server keeps the momentum m_t (descent direction, m_0 = 0) and broadcasts it. Clients take
    K steps with the gradient evaluated at y + gamma*m_t - rho*m_t/|m_t| (one backprop; with
    m = 0 plain SGD) and release Delta_i = y_K - x_t. Server: m_{t+1} = gamma*m_t + mean(Delta),
    x_{t+1} = x_t + m_{t+1}. With nsam-form='code' clients run local SAM from the look-ahead
    start x_t + gamma*m_t instead (the authors' current code), with the same, correctly
    accumulated, server momentum. The momentum is post-processing of the privatised mean, so it
    composes with every DP placement.
    """

    paper = "Liu, Shang, Tian et al., ACM MM 2025"
    server_state = "x, m_t"


    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.hparams = config.hparams(NSAMParams)
        self.momentum = Momentum()

    @property
    def local_rule(self) -> str:  # type: ignore[override]
        """'nsam' (paper) or 'nsam-code'."""
        return "nsam" if self.hparams.form == "paper" else "nsam-code"

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """m_t as the second ArrayRecord, ``momentum``."""
        return {"momentum": self.momentum.record(self.trainable())}

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """m_{t+1} = gamma*m_t + mean(Delta); x_{t+1} = x_t + m_{t+1}."""
        momentum = self.momentum.step(self.hparams.gamma, aggregate.mean, self.trainable())
        return {k: self.current[k] + momentum[k] for k in self.parameter_names}


def nsam(task: LocalTask) -> Tensors:
    """The gradient at y + gamma*m - rho*m/|m| (one backprop); releases Delta."""
    params = task.hparams(NSAMParams)
    momentum = task.vector("momentum")
    direction = unit(momentum) if momentum is not None else None
    shift = None
    if momentum is not None and direction is not None:
        shift = combine(momentum, direction, weights=(params.gamma, -params.rho))
    run_steps(task, lambda x, y: task.stability_clip(task.gradients_at(shift, x, y)))
    return task.delta()


def nsam_code(task: LocalTask) -> Tensors:
    """As the authors' code runs it: start at z_0 = x_t + gamma*m, then local SAM (two
    backprops); releases Delta = z_K - z_0."""
    params = task.hparams(NSAMParams)
    momentum = task.vector("momentum")
    if momentum is not None:
        with torch.no_grad():
            for p, m in zip(task.params, momentum, strict=True):
                p.add_(params.gamma * m)
        task.start = [p.detach().clone() for p in task.params]
    run_steps(task, lambda x, y: task.stability_clip(sam_gradient(task, x, y, params.rho)))
    return task.delta()


register(Algorithm("fednsam", FedNSAM, params=(NSAMParams,), core=True, rules={
    "nsam": LocalRule(nsam, 1), "nsam-code": LocalRule(nsam_code, 2)}))
