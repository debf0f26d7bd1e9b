"""Server state that several algorithms share: pieces a strategy holds, each written once.

A piece is a ``ServerState``: a named vector over the trainable parameters, zero until its first
update. A strategy holds its pieces as attributes; the strategy finds them itself when it saves
or restores a checkpoint, so no piece can be forgotten in a list of names.

* ``Momentum``: m_{t+1} = beta*m_t + mean(Delta). FedAvgM, FedACG and FedNSAM hold one.
* ``GlobalDirection``: c_t = (x_{t-1} - x_t) / (K * lr_{t-1}), the last global update per local
  step in the gradient direction (0 before the first update), broadcast as ``direction``.
  DP-FedPGN, FedCM, MoFedSAM and FedLESAM hold one.
* ``ControlVariate``: SCAFFOLD's c, broadcast as ``control``; clients upload their
  control-variate change next to the model update (``cv:``-prefixed, privatised together).
  SCAFFOLD and FedGAMMA hold one.
* ``DynamicRegulariser``: FedDyn's mean accumulated update H = (1/N) sum_i H_i, which moves the
  model to mean(y) + H. FedDyn, FedSMOO and FedSpeed hold one.

All of them are post-processing of the privatised mean, so they cost no privacy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from flwr.app import ArrayRecord

from plateau.config import ConfigError, RunConfig
from plateau.messages import tensors_record
from plateau.privacy.mechanism import Tensors

from .aggregation import Aggregate


class ServerState(Mapping[str, torch.Tensor]):
    """A named vector of server state over the trainable parameters (zeros before its first
    update), with the ``state_dict``/``load_state_dict`` a checkpoint uses. Reads like the
    mapping of its tensors (empty before the first update)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.value: Tensors = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.value[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.value)

    def __len__(self) -> int:
        return len(self.value)

    def get(self, like: Tensors) -> Tensors:
        """The state, zeros shaped like ``like`` (the trainable parameters) before any update."""
        if not self.value:
            self.value = {k: torch.zeros_like(v) for k, v in like.items()}
        return self.value

    def record(self, like: Tensors) -> ArrayRecord:
        """The state as an ArrayRecord to broadcast (on the CPU, where messages live)."""
        return tensors_record(self.get(like))

    def state_dict(self) -> Tensors:
        """The tensors, on the CPU (empty before the first update)."""
        return {k: v.detach().cpu() for k, v in self.value.items()}

    def check(self, tensors: Tensors, model: Tensors) -> None:
        """Refuse saved tensors whose names or shapes do not fit the model."""
        for key, tensor in tensors.items():
            if key not in model or tuple(tensor.shape) != tuple(model[key].shape):
                raise ConfigError(f"resume refused: the checkpoint's {self.name}[{key!r}] does "
                                  f"not fit the model ({tuple(tensor.shape)})")

    def load_state_dict(self, tensors: Tensors, device: torch.device) -> None:
        """Set the state from ``state_dict``'s output (checked first with ``check``)."""
        self.value = {k: v.to(device) for k, v in tensors.items()}

    def metrics(self) -> dict[str, float]:
        """The piece's own round metrics (none by default)."""
        return {}


class Momentum(ServerState):
    """A server momentum m_{t+1} = beta*m_t + mean(Delta) (m_0 = 0): FedAvgM's, FedACG's
    look-ahead momentum and FedNSAM's broadcast momentum."""

    def __init__(self, name: str = "momentum") -> None:
        super().__init__(name)

    def step(self, beta: float, mean: Tensors, like: Tensors) -> Tensors:
        """m <- beta*m + mean(Delta), kept and returned."""
        momentum = self.get(like)
        self.value = {k: beta * momentum[k] + mean[k] for k in like}
        return self.value


class GlobalDirection(ServerState):
    """The global direction c_t, with its optional noise-aware shrinkage."""

    def __init__(self, config: RunConfig, name: str = "direction") -> None:
        super().__init__(name)
        self.config = config
        self.last_shrinkage: float | None = None

    def remember(self, descent: Tensors, per_step: float, released: Aggregate) -> None:
        """c_{t+1} = s * descent / per_step, descent = x_t - x_{t+1} before any smoothing,
        per_step = K * lr_t, s the noise-aware shrinkage (1 unless direction-shrinkage='snr')."""
        factor = self.shrinkage(descent, released)
        self.value = {k: factor * v / per_step for k, v in descent.items()}

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

    def metrics(self) -> dict[str, float]:
        """The round's shrinkage factor, when one was applied."""
        if self.last_shrinkage is None:
            return {}
        return {"direction-shrinkage": self.last_shrinkage}


class ControlVariate(ServerState):
    """SCAFFOLD's server control variate c, updated from the clients' control-variate uploads."""

    def __init__(self, prefix: str, name: str = "control") -> None:
        super().__init__(name)
        self.prefix = prefix  # of the uploaded control-variate change's names

    def uploads(self, params: Tensors) -> Tensors:
        """The release template's extra half: the control-variate change of each parameter."""
        return {self.prefix + k: v for k, v in params.items()}

    def update(self, aggregate: Aggregate, like: Tensors) -> None:
        """c <- c + (1/N) sum_{i in S} delta_c_i (the sum is the mean times its denominator)."""
        share = aggregate.denominator / max(aggregate.population, 1)
        control = self.get(like)
        self.value = {k: control[k] + share * aggregate.mean[self.prefix + k] for k in like}


class DynamicRegulariser(ServerState):
    """FedDyn's server state: H = (1/N) sum_i H_i over the whole population."""

    def __init__(self, name: str = "accumulated") -> None:
        super().__init__(name)

    def step(self, aggregate: Aggregate, current: Tensors) -> Tensors:
        """H <- H + (1/N) sum_{i in S} Delta_i;  x_{t+1} = x_t + mean(Delta) + H, over the
        trainable parameters ``current``."""
        accumulated = self.get(current)
        share = aggregate.denominator / max(aggregate.population, 1)
        self.value = {k: accumulated[k] + share * aggregate.mean[k] for k in current}
        return {k: current[k] + aggregate.mean[k] + self.value[k] for k in current}
