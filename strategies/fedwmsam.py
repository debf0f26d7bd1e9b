"""FedWMSAM: the global momentum as the SAM perturbation (one backprop), with personalised
momentum and a cosine-adaptive weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord

from plateau.config import ConfigError, Params, RunConfig, key
from plateau.local import LocalTask, combine, run_steps, unit
from plateau.privacy.mechanism import Tensors, flat_norm
from plateau.privacy.release import CONTROL_PREFIX

from .aggregation import Aggregate
from .base import PlateauStrategy
from .registry import Algorithm, LocalRule, register
from .scaffold import control_pair, control_release
from .shared import ControlVariate, GlobalDirection, ServerState

# the cosine schedule of the authors' code (server/FedWMSAM.py, global_update):
# alpha <- DECAY*alpha + (1 - DECAY)*clip(1 + cos, FLOOR, CEILING)
DECAY, FLOOR, CEILING = 0.99, 0.1, 0.9


@dataclass(frozen=True)
class WMSAMParams(Params):
    """FedWMSAM's weight, radius and schedule (keys ``wmsam-*``)."""

    prefix = "wmsam"
    alpha: float = key(0.1, "FedWMSAM: weight of the local gradient (alpha_0 under the cosine "
                       "schedule); 1 - alpha goes to the global direction.", min=0, max=1)
    rho: float = key(0.01, "FedWMSAM: SAM radius towards the momentum-predicted global model.",
                     min=0)
    schedule: str = key(
        "cosine", "FedWMSAM: 'cosine' = alpha_{t+1} = 0.99*alpha_t + 0.01*clip(1 + cos(mean "
        "update, c_t), 0.1, 0.9), from the released mean; 'fixed' = alpha stays wmsam-alpha.",
        choices=("cosine", "fixed"))


class MixingWeight(ServerState):
    """FedWMSAM's alpha_t: one number, broadcast as the ArrayRecord ``mixing`` (``alpha``)."""

    KEY = "alpha"

    def __init__(self, initial: float, name: str = "mixing") -> None:
        super().__init__(name)
        self.initial = initial

    def get(self, like: Tensors | None = None) -> Tensors:
        """{alpha: alpha_t}, alpha_0 = wmsam-alpha before any update."""
        if not self.value:
            self.value = {self.KEY: torch.tensor([self.initial], dtype=torch.float64)}
        return self.value

    @property
    def alpha(self) -> float:
        return float(self.get()[self.KEY][0])

    def step(self, agreement: float) -> None:
        """alpha <- DECAY*alpha + (1 - DECAY)*clip(agreement, FLOOR, CEILING)."""
        target = min(max(agreement, FLOOR), CEILING)
        alpha = self.get()[self.KEY]
        self.value = {self.KEY: DECAY * alpha + (1 - DECAY) * target}

    def check(self, tensors: Tensors, model: Tensors) -> None:
        """A checkpoint's alpha_t: one number, nothing else."""
        if set(tensors) != {self.KEY} or tensors[self.KEY].numel() != 1:
            raise ConfigError(f"resume refused: the checkpoint's {self.name} is not one number "
                              f"named {self.KEY!r}")

    def metrics(self) -> dict[str, float]:
        return {"wmsam-alpha": self.alpha} if self.value else {}


def agreement(step: Tensors, direction: Tensors) -> float:
    """1 + cos(mean(Delta), c_t) over the trainable parameters; 0 when either is zero (the
    authors' code returns 0, not 1, for an undefined cosine: round 1 pulls alpha to 0.1)."""
    norms = flat_norm(step) * flat_norm(direction)
    if norms == 0:
        return 0.0
    dot = sum(float((step[k].double() * direction[k].double()).sum()) for k in step)
    return 1.0 + dot / norms


class FedWMSAM(PlateauStrategy):
    """FedWMSAM.

    Li, Huang, Jiang et al., "FedWMSAM: Fast and Flat Federated Learning via Weighted Momentum
    and Sharpness-Aware Minimization", NeurIPS 2025 (arXiv:2511.22080; the rule as stated in
    the authors' repository Huang-Yongzhi/NeurlPS_FedWMSAM, README "Method").

    The server broadcasts the global direction c_t (FedCM's: the last global update per local
    step, gradient-signed), SCAFFOLD's c and the weight alpha_t. A client with control variate
    c_i forms the personalised momentum D = c_t + alpha/(1-alpha)*(c - c_i); at step b
    (b = 0..K-1) it takes the gradient g at y_b + rho*d/|d|, d = (x_t + b*D) - y_b, the
    direction of the momentum-predicted global model (one backprop; none at b = 0, d = 0), and
    steps along alpha*clip(g) + (1-alpha)*D = alpha*(clip(g) - c_i + c) + (1-alpha)*c_t. It
    then updates c_i as SCAFFOLD option II and releases (Delta_y, Delta_c). Server:
    x_{t+1} = x_t + mean(Delta_y), c <- c + (1/N) sum Delta_c, c_{t+1} = -mean(Delta_y)/(K lr_t),
    and (``wmsam-schedule='cosine'``) alpha_{t+1} = 0.99*alpha_t + 0.01*clip(1 + cos(mean(Delta_y),
    c_t), 0.1, 0.9). The authors average per-client cosines; here the cosine is of the released
    mean, so every server quantity is post-processing of it and composes with every DP
    placement. With rho = 0 and wmsam-alpha = 1 (fixed) it is SCAFFOLD.
    """

    paper = "Li, Huang, Jiang et al., NeurIPS 2025"
    server_state = "x, c_t, c, alpha_t"
    client_state = "c_i"

    local_rule = "wmsam"

    def __init__(self, config: RunConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.hparams = config.hparams(WMSAMParams)
        self.direction = GlobalDirection(config)
        self.control = ControlVariate(CONTROL_PREFIX)
        self.mixing = MixingWeight(self.hparams.alpha)

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """c_t (``direction``), c (``control``) and alpha_t (``mixing``)."""
        params = self.trainable()
        return {"direction": self.direction.record(params),
                "control": self.control.record(params), "mixing": self.mixing.record(params)}

    def release_template(self) -> Tensors:
        """The model update and the control-variate change, clipped and noised together."""
        params = self.trainable()
        return {**params, **self.control.uploads(params)}

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """alpha from cos(mean(Delta), c_t); c <- c + (1/N) sum(Delta_c);
        c_t <- -mean(Delta)/(K lr); x <- x + mean(Delta)."""
        step = {k: aggregate.mean[k] for k in self.parameter_names}
        if self.hparams.schedule == "cosine":
            self.mixing.step(agreement(step, self.direction.get(self.trainable())))
        self.control.update(aggregate, self.trainable())
        self.direction.remember({k: -v for k, v in step.items()},
                                self.step_scale(server_round), aggregate)
        return {k: self.current[k] + step[k] for k in self.parameter_names}


def wmsam(task: LocalTask) -> Tensors:
    """alpha*(clip(g(y + rho*d/|d|)) - c_i + c) + (1-alpha)*c_t, d = x_t + b*D - y (one
    backprop); releases (Delta_y, Delta_c) and keeps c_i+."""
    params = task.hparams(WMSAMParams)
    mixing = task.broadcast.get("mixing")
    alpha = float(mixing[MixingWeight.KEY].reshape(-1)[0]) if mixing else params.alpha
    direction = task.vector("direction")
    control, own = control_pair(task)
    correction = combine(control, own, weights=(1.0, -1.0))  # c - c_i
    # (1-alpha)*D = (1-alpha)*c_t + alpha*(c - c_i): d scaled by (1-alpha) has the same unit
    # vector and stays defined at alpha = 1
    personal = combine(direction, correction, weights=(1.0 - alpha, alpha))
    step = 0

    def gradient(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        nonlocal step
        shift = None
        if params.rho > 0 and step > 0:
            towards = unit(combine(personal, task.drift(task.start),
                                   weights=(float(step), -(1.0 - alpha))))
            shift = [params.rho * t for t in towards] if towards is not None else None
        step += 1
        g = task.stability_clip(task.gradients_at(shift, x, y))
        return combine(g, correction, direction, weights=(alpha, alpha, 1.0 - alpha))

    run_steps(task, gradient)
    return control_release(task, control, own)


register(Algorithm("fedwmsam", FedWMSAM, params=(WMSAMParams,),
                   rules={"wmsam": LocalRule(wmsam, 1)}))
