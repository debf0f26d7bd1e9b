"""The algorithms table (``make algorithms``; the README carries the same table).

It joins what each side declares: the strategy's paper, server and client state, and what its
clients release; the local rule's cost in backprops per step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from plateau.config import RunConfig
from plateau.privacy.release import CONTROL_PREFIX, DUAL_PREFIX
from strategies import LOCAL_RULES, STRATEGIES, PlateauStrategy

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


def write_table(readme: Path) -> None:
    """Replace the algorithms table in the README with the generated one."""
    text = readme.read_text()
    start = text.index("| `algorithm` | paper |")
    readme.write_text(text[:start] + algorithms_table() + text[text.index("\n\n", start):])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_table(Path(sys.argv[2] if len(sys.argv) > 2 else "README.md"))
    else:
        print(algorithms_table())
