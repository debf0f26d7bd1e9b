"""The algorithms table (``make algorithms``; the README carries the same table).

It joins what each side declares: the strategy's paper, server and client state, and what its
clients release; the local rule's cost in backprops per step.
"""

from __future__ import annotations

import torch

from client_app.training import LOCAL_RULES
from plateau.config import RunConfig
from plateau.release import CONTROL_PREFIX, DUAL_PREFIX
from strategies import STRATEGIES, PlateauStrategy

UPLOADS = {CONTROL_PREFIX: "control-variate change", DUAL_PREFIX: "perturbation dual"}


def probe_strategy(config: RunConfig) -> PlateauStrategy:
    """The configured strategy over one placeholder tensor: enough to ask what its clients run
    and release, without building the model."""
    strategy = STRATEGIES[config.algorithm](config, parameter_names=["w"], buffer_names=[])
    strategy.current = {"w": torch.zeros(1)}
    return strategy


def backprops_per_step(config: RunConfig) -> int:
    """Backprops per local step of the configured rule (its form included)."""
    return LOCAL_RULES[probe_strategy(config).local_rule].backprops_per_step


def algorithms_table() -> str:
    """Markdown table of every algorithm with its default configuration."""
    lines = ["| `algorithm` | paper | local rule (backprops / step) | server state | "
             "client state | released (clipped and noised together under DP) |",
             "|---|---|---|---|---|---|"]
    for name, strategy_class in STRATEGIES.items():
        strategy = probe_strategy(RunConfig.from_mapping({"algorithm": name}))
        rule = strategy.local_rule
        extras = sorted({UPLOADS[k[:3]] for k in strategy.release_template() if k[:3] in UPLOADS})
        released = ", ".join([strategy_class.released, *extras])
        lines.append(
            f"| `{name}` | {strategy_class.paper} | `{rule}` "
            f"({LOCAL_RULES[rule].backprops_per_step}) | {strategy_class.server_state} | "
            f"{strategy_class.client_state or '-'} | {released} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(algorithms_table())
