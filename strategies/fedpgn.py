"""DP-FedPGN: a global gradient-norm penalty through the server's global direction c_t."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord

from plateau.config import Params, RunConfig, key
from plateau.local import Grads, LocalTask, combine, run_steps, unit
from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, LocalRule, register

from .aggregation import Aggregate
from .base import PlateauStrategy
from .shared import GlobalDirection


@dataclass(frozen=True)
class PGNParams(Params):
    """DP-FedPGN's local direction (keys ``pgn-*``)."""

    prefix = "pgn"
    gamma: float = key(0.2, "DP-FedPGN: weight of the local gradient; 1 - pgn-gamma goes to the "
                       "global direction c_t (authors' run: 0.2).", min=0, max=1)
    form: str = key(
        "mix", "DP-FedPGN local direction: 'mix' = pgn-gamma*g + (1-pgn-gamma)*c_t (1 backprop); "
        "'perturb' = (1-pgn-alpha)*g(y) + pgn-alpha*g(y + pgn-radius*c_t/|c_t|) (2 backprops).",
        choices=("mix", "perturb"))
    alpha: float = key(0.5, "DP-FedPGN 'perturb' form: weight of the gradient at the perturbed "
                       "point (penalty lambda / radius).", min=0, max=1)
    radius: float = key(0.05, "DP-FedPGN 'perturb' form: finite-difference radius r along the "
                        "global direction.", min=0)


class FedPGN(PlateauStrategy):
    """DP-FedPGN (with ``dp`` off: FedPGN).

    Liu, Tian, Shang et al., "DP-FedPGN: Finding Global Flat Minima for Differentially Private
    Federated Learning via Penalizing Gradient Norm", arXiv:2510.27504 (2025); rules as in the
    implementation spec (docs/algorithms.md §3).

    The server broadcasts the global direction c_t (the previous round's noisy global update per
    local step, c_0 = 0). In the ``mix`` form clients step along pgn-gamma*g + (1-pgn-gamma)*c_t
    and release only the private part R_i = (x_t - y_K) - (1-pgn-gamma)*K*lr_t*c_t, so clipping
    acts on the local-gradient part alone; in the ``perturb`` form they step along
    (1-alpha)*g(y) + alpha*g(y + r*c_t/|c_t|) and release R_i = x_t - y_K. The server adds the
    public part back to the privatised mean, D = R + (1-gamma)*K*lr_t*c_t (0 in ``perturb``),
    moves to x_{t+1} = x_t - smooth(D) and sets c_{t+1} = D / (K*lr_t) itself: clients never
    upload c.
    """

    paper = "Liu, Tian, Shang et al., arXiv:2510.27504"
    server_state = "x, c_t"
    released = "private part R of the update"

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.hparams = config.hparams(PGNParams)
        self.direction = GlobalDirection(config)

    @property
    def local_rule(self) -> str:  # type: ignore[override]
        """'pgn-mix' or 'pgn-perturb', from pgn-form."""
        return f"pgn-{self.hparams.form}"

    def public_part_scale(self, server_round: int) -> float:
        """(1 - gamma) * K * lr_t: how much of c_t the clients' own steps carried."""
        if self.hparams.form != "mix":
            return 0.0
        return (1 - self.hparams.gamma) * self.step_scale(server_round)

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """c_t as the ArrayRecord ``direction``."""
        return {"direction": self.direction.record(self.trainable())}

    def smooth(self, update: Tensors) -> Tensors:
        """Post-processing applied to D before the model update (identity here)."""
        return update

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """D = R + (1-gamma)K lr c_t; x_{t+1} = x_t - smooth(D); c_{t+1} = D / (K lr_t)."""
        scale = self.public_part_scale(server_round)
        direction = self.direction.get(self.trainable())
        full = {k: aggregate.mean[k] + scale * direction[k] for k in self.parameter_names}
        step = self.smooth(full)
        self.direction.remember(full, self.step_scale(server_round), aggregate)
        return {k: self.current[k] - step[k] for k in self.parameter_names}


def pgn_mix(task: LocalTask) -> Tensors:
    """d = gamma*clip(g) + (1-gamma)*c_t; releases the private part
    R = (x_t - y_K) - (1-gamma)*K*lr*c_t (the public drift is removed before clipping)."""
    gamma = task.hparams(PGNParams).gamma
    direction = task.vector("direction") or task.zeros()
    run_steps(task, lambda x, y: combine(task.stability_clip(task.gradients(x, y)), direction,
                                         weights=(gamma, 1 - gamma)))
    public = (1 - gamma) * task.config.local_steps * task.lr
    return {n: -d - public * c
            for (n, d), c in zip(task.delta().items(), direction, strict=True)}


def pgn_perturb(task: LocalTask) -> Tensors:
    """Penalty form: d = (1-alpha)*g(y) + alpha*g(y + r*c_t/|c_t|) (two backprops); releases
    R = x_t - y_K (nothing public to remove)."""
    params = task.hparams(PGNParams)
    direction = task.vector("direction")
    ascent = unit(direction) if direction is not None else None
    shift = [params.radius * a for a in ascent] if ascent is not None else None

    def mixed(x: torch.Tensor, y: torch.Tensor) -> Grads:
        here = task.gradients(x, y)
        there = here if shift is None else task.gradients_at(shift, x, y, record=False)
        return task.stability_clip(combine(here, there, weights=(1 - params.alpha,
                                                                 params.alpha)))

    run_steps(task, mixed)
    return {n: -d for n, d in task.delta().items()}


register(Algorithm("fedpgn", FedPGN, params=(PGNParams,), core=True, rules={
    "pgn-mix": LocalRule(pgn_mix, 1), "pgn-perturb": LocalRule(pgn_perturb, 2)}))
