"""FedSMOO: dynamic regulariser plus a SAM perturbation corrected towards a global one."""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord

from plateau.config import RunConfig
from plateau.local import Grads, LocalTask, combine, run_steps
from plateau.privacy.mechanism import Tensors, flat_norm
from plateau.privacy.release import DUAL_PREFIX
from strategies.registry import Algorithm, LocalRule, register

from .aggregation import Aggregate
from .base import PlateauStrategy
from .feddyn import DynParams
from .fedsam import SAMParams
from .shared import DynamicRegulariser, ServerState


class FedSMOO(PlateauStrategy):
    """FedSMOO.

    Sun, Shen, Chen et al., "Dynamic Regularized Sharpness Aware Minimization in Federated
    Learning: Approaching Global Consistency and Smooth Landscape", ICML 2023
    (arXiv:2305.11584); the rule of ``woodenchild95/FL-Simulator`` (docs/algorithms.md §5.10).

    Clients keep H_i and the perturbation dual mu_i in ``Context.state``. Per step:
    g_hat = g - mu_i - s_t, s_hat = rho*g_hat/(|g_hat| + 1e-7), mu_i <- mu_i + s_hat - s_t, and
    the step direction is g(y + s_hat) + lambda*(y - x_t + H_i). They release (Delta_i, mu_i),
    privatised together. Server: the FedDyn update, and the global perturbation
    s_{t+1} = rho*mean(mu)/(|mean(mu)| + 1e-7), broadcast as ``perturbation``.
    """

    paper = "Sun et al., ICML 2023"
    server_state = "x, H, s_t"
    client_state = "H_i, mu_i"

    local_rule = "smoo"

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.accumulated = DynamicRegulariser()
        self.perturbation = ServerState("perturbation")

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """s_t as the ArrayRecord ``perturbation``."""
        return {"perturbation": self.perturbation.record(self.trainable())}

    def release_template(self) -> Tensors:
        """The model update and the dual mu_i, clipped and noised together."""
        params = self.trainable()
        return {**params, **{DUAL_PREFIX + k: v for k, v in params.items()}}

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """FedDyn's model update; s_{t+1} = rho * mean(mu) / (|mean(mu)| + 1e-7)."""
        mean_dual = {k: aggregate.mean[DUAL_PREFIX + k] for k in self.parameter_names}
        scale = self.config.hparams(SAMParams).rho / (flat_norm(mean_dual) + 1e-7)
        self.perturbation.value = {k: scale * v for k, v in mean_dual.items()}
        return self.accumulated.step(aggregate, self.trainable())


def smoo(task: LocalTask) -> Tensors:
    """The corrected SAM perturbation and FedDyn's regulariser, the step
    y <- y - lr * (clip(g(y + s) + lam*(H_i - x_t)) + (lam + wd)*y) as in FL-Simulator; releases
    (Delta, mu_i) and keeps H_i, mu_i in the state."""
    rho, lam = task.hparams(SAMParams).rho, task.hparams(DynParams).alpha
    perturbation = task.vector("perturbation") or task.zeros()
    dual = task.own_state("dual", task.zeros())
    accumulated, anchor = task.accumulated_anchor()

    def direction(x: torch.Tensor, y: torch.Tensor) -> Grads:
        nonlocal dual
        g = task.gradients(x, y)
        corrected = combine(g, dual, perturbation, weights=(1.0, -1.0, -1.0))
        norm = flat_norm(dict(enumerate(corrected)))
        shift = [rho * c / (norm + 1e-7) for c in corrected]
        dual = combine(dual, shift, perturbation, weights=(1.0, 1.0, -1.0))
        sharp = task.gradients_at(shift, x, y, record=False)
        return task.clipped_with_pull(sharp, anchor, lam)

    run_steps(task, direction)
    delta = task.delta()
    task.keep_state("dual", dual)
    task.keep_state("accumulated", combine(accumulated, list(delta.values())))
    return {**delta, **{DUAL_PREFIX + n: m for n, m in zip(delta, dual, strict=True)}}


register(Algorithm("fedsmoo", FedSMOO, rules={"smoo": LocalRule(smoo, 2)},
                   params=(SAMParams, DynParams)))
