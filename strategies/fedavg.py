"""FedAvg, and with a privacy mechanism DP-FedAvg."""

from __future__ import annotations

from plateau.local import LocalTask, run_steps
from plateau.privacy.mechanism import Tensors
from strategies.registry import Algorithm, LocalRule, register

from .aggregation import Aggregate
from .base import PlateauStrategy


class FedAvg(PlateauStrategy):
    """Federated Averaging; with client-level DP it is DP-FedAvg.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 (https://arxiv.org/abs/1602.05629); DP-FedAvg: McMahan et al., "Learning
    Differentially Private Recurrent Language Models", ICLR 2018
    (https://arxiv.org/abs/1710.06963).

    Clients run K local SGD steps from x_t and release Delta_i = y_K - x_t; the server moves to
    x_{t+1} = x_t + mean(Delta) (server learning rate 1, as in both papers' code). Under DP the
    mean is the noisy sum of flat-clipped Delta_i divided by the number of clients sampled.
    """

    paper = "McMahan et al., AISTATS 2017; DP-FedAvg: McMahan et al., ICLR 2018"
    server_state = "x"

    local_rule = "sgd"

    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """x_{t+1} = x_t + mean(Delta)."""
        return {k: self.current[k] + aggregate.mean[k] for k in self.parameter_names}


def sgd(task: LocalTask) -> Tensors:
    """K steps of SGD; releases Delta = y_K - x_t."""
    run_steps(task, lambda x, y: task.stability_clip(task.gradients(x, y)))
    return task.delta()


register(Algorithm("fedavg", FedAvg, rules={"sgd": LocalRule(sgd, 1)}))
