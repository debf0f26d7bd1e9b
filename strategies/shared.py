"""Server state that several algorithms share, each written once.

* ``ServerMomentum``: m_{t+1} = beta*m_t + mean(Delta). FedAvgM, FedACG and FedNSAM use it.
* ``GlobalDirection``: c_t = (x_{t-1} - x_t) / (K * lr_{t-1}), the last global update per local
  step in the gradient direction (0 before the first update), broadcast as ``direction``.
  DP-FedPGN, FedCM, MoFedSAM and FedLESAM use it.
* ``ServerControlVariate``: SCAFFOLD's c, broadcast as ``control``; clients upload their
  control-variate change next to the model update (``cv:``-prefixed, privatised together).
  SCAFFOLD and FedGAMMA use it.
* ``DynamicRegulariser``: FedDyn's mean accumulated update H = (1/N) sum_i H_i, which moves the
  model to mean(y) + H. FedDyn and FedSMOO use it.

All of them are post-processing of the privatised mean, so they cost no privacy.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord

from plateau.config import RunConfig
from plateau.privacy import Tensors
from plateau.release import CONTROL_PREFIX

from .base import Aggregate, PlateauStrategy


class ServerMomentum(PlateauStrategy):
    """A server momentum m_{t+1} = beta*m_t + mean(Delta) (m_0 = 0): FedAvgM's, FedACG's
    look-ahead momentum and FedNSAM's broadcast momentum."""

    state_attributes = ("momentum",)

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.momentum: Tensors = {}

    def momentum_step(self, beta: float, aggregate: Aggregate) -> Tensors:
        """m_{t+1} = beta*m_t + mean(Delta), kept and returned."""
        momentum = self.state_tensors("momentum")
        self.momentum = {k: beta * momentum[k] + aggregate.mean[k] for k in self.parameter_names}
        return self.momentum


class GlobalDirection(PlateauStrategy):
    """Keeps and broadcasts the global direction c_t."""

    state_attributes = ("direction",)

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.direction: Tensors = {}
        self.last_shrinkage: float | None = None

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """c_t as the ArrayRecord ``direction``."""
        return {"direction": self.as_record(self.state_tensors("direction"))}

    def remember_step(self, server_round: int, descent: Tensors, released: Aggregate) -> None:
        """c_{t+1} = s * descent / (K * lr_t), descent = x_t - x_{t+1} before any smoothing, s
        the noise-aware shrinkage (1 unless direction-shrinkage='snr')."""
        per_step = self.config.local_steps * self.learning_rate(server_round)
        factor = self.shrinkage(descent, released)
        self.direction = {k: factor * v / per_step for k, v in descent.items()}

    def shrinkage(self, descent: Tensors, released: Aggregate) -> float:
        """max(0, 1 - d v / |D|^2): the share of |D|^2 that is not the DP noise's expected
        power (v per coordinate, d coordinates), so a direction that is mostly noise is not
        fed back into every client's steps. Computed from the released mean and public
        constants only; 1 without DP, with the option off, or without a formal noise scale."""
        self.last_shrinkage = None
        multiplier = released.noise_multiplier
        if self.config.direction_shrinkage == "off" or not multiplier:
            return 1.0
        variance = (multiplier * self.config.clip_norm / max(released.denominator, 1.0)) ** 2
        dim = sum(v.numel() for v in descent.values())
        power = sum(float(v.double().square().sum()) for v in descent.values())
        self.last_shrinkage = max(0.0, 1.0 - dim * variance / power) if power > 0 else 0.0
        return self.last_shrinkage

    def round_metrics(self) -> dict[str, float]:
        """The round's shrinkage factor, when one was applied."""
        if self.last_shrinkage is None:
            return {}
        return {"direction-shrinkage": self.last_shrinkage}


class ServerControlVariate(PlateauStrategy):
    """SCAFFOLD's server control variate c and the clients' control-variate uploads."""

    state_attributes = ("control",)

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.control: Tensors = {}

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """c as the ArrayRecord ``control``."""
        return {"control": self.as_record(self.state_tensors("control"))}

    def release_template(self) -> Tensors:
        """The model update and the control-variate change, clipped and noised together."""
        params = super().release_template()
        return {**params, **{CONTROL_PREFIX + k: v for k, v in params.items()}}

    def update_control(self, aggregate: Aggregate) -> None:
        """c <- c + (1/N) sum_{i in S} delta_c_i (the sum is the mean times its denominator)."""
        share = aggregate.denominator / max(aggregate.population, 1)
        control = self.state_tensors("control")
        self.control = {k: control[k] + share * aggregate.mean[CONTROL_PREFIX + k]
                        for k in self.parameter_names}


class DynamicRegulariser(PlateauStrategy):
    """FedDyn's server state: H = (1/N) sum_i H_i over the whole population."""

    state_attributes = ("accumulated",)

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.accumulated: Tensors = {}

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """FedDyn's server step (FedSMOO adds its perturbation to it)."""
        return self.step_with_regulariser(aggregate)

    def step_with_regulariser(self, aggregate: Aggregate) -> Tensors:
        """H <- H + (1/N) sum_{i in S} Delta_i;  x_{t+1} = x_t + mean(Delta) + H."""
        accumulated = self.state_tensors("accumulated")
        share = aggregate.denominator / max(aggregate.population, 1)
        self.accumulated = {k: accumulated[k] + share * aggregate.mean[k]
                            for k in self.parameter_names}
        return {k: self.current[k] + aggregate.mean[k] + self.accumulated[k]
                for k in self.parameter_names}
