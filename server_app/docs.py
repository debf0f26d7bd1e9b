"""The reference tables of docs/, made from the code they describe: ``make docs`` writes them and
the tests fail when they are stale.

* ``docs/config.md``: every run-config key (``plateau.config``'s schema);
* ``docs/outputs.md``: every key of rounds.jsonl and summary.json (``server_app.results``);
* ``docs/metrics.md``: every Prometheus series the ServerApp exports (``server_app.metrics``);
* ``plateau/algorithm_keys.py``: the algorithms' run-config keys, which the run config reads
  without importing the algorithms (``--write-keys``).

    python -m server_app.docs [--write ROOT | --write-keys ROOT]
"""

from __future__ import annotations

import sys
from pathlib import Path

from plateau.config import RunConfig, algorithm_key_table, readme_table
from plateau.export import DESCRIPTOR_KEYS

from .metrics import RunMetrics
from .results import ROUND_KEYS, SUMMARY_KEYS

HEADER = "<!-- made by `make docs` (python -m server_app.docs --write .): do not edit -->\n\n"


def config_doc() -> str:
    return (HEADER + "# Run configuration\n\nEvery key lives in `[tool.flwr.app.config]` of "
            "`pyproject.toml`, can be overridden with `--run-config` / `make run CONFIG=...`, "
            "and is validated once at start-up (type, range, allowed values and combinations; "
            "an error names the key and what is allowed). The whole resolved config travels to "
            "the clients in every round's message.\n\n" + readme_table() + "\n")


def outputs_doc() -> str:
    lines = [HEADER + "# Outputs\n", "Each run writes `<results-dir>/<run-name>/`.\n",
             "## rounds.jsonl\n", "One object per round, appended as the round ends.\n",
             "| key | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in ROUND_KEYS.items()]
    lines += ["", "## summary.json\n", "Written when the run ends, however it ends.\n",
              "| key | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in SUMMARY_KEYS.items()]
    lines += ["", "## model/model.json\n", "The exported model's description (README, \"The "
              "model you take home\"), beside its weights.\n", "| key | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in DESCRIPTOR_KEYS.items()]
    return "\n".join(lines) + "\n"


# a round that touches every series, so that each family's samples show its labels
SAMPLE_ROUND = {"round": 1, "test_accuracy": 0.5, "test_loss": 1.0, "train_loss": 1.0,
                "clip_fraction": 0.5, "global_update_norm": 1.0, "sharpness": 0.1,
                "hessian_top_eigenvalue": 1.0, "epsilon": 1.0, "num_sampled": 1,
                "num_clients": 1, "wall_s": 1.0, "epsilon_against_server": 1.0,
                "audit_epsilon_lower_bound": 0.1, "audit_epsilon_estimate": 0.1,
                "record_epsilon": {"0": 1.0}, "record_budget": {"0": "within budget"},
                "declined": {"no-data": 1}}


def metrics_doc() -> str:
    metrics = RunMetrics(RunConfig.from_mapping({}), "docs")
    metrics.observe_round(SAMPLE_ROUND, [1.0], {"malformed": 1}, {"error": 1}, (1, 1))
    lines = [HEADER + "# Metrics\n",
             "`metrics-port` serves these at `http://<metrics-addr>:<port>/metrics` while the "
             "run lasts; `metrics-pushgateway` pushes them after every round. Every series "
             "carries the labels `run` and `algorithm`. Series marked operator telemetry are "
             "not covered by any epsilon.\n", "| series | type | extra labels | meaning |",
             "|---|---|---|---|"]
    for family in sorted(metrics.registry.collect(), key=lambda f: f.name):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = sorted({k for sample in family.samples for k in sample.labels}
                        - {"run", "algorithm", "le"})
        lines.append(f"| `{name}` | {family.type} | {', '.join(labels) or '-'} | "
                     f"{family.documentation} |")
    return "\n".join(lines) + "\n"


DOCS = {"config.md": config_doc, "outputs.md": outputs_doc, "metrics.md": metrics_doc}


def write(root: Path) -> None:
    folder = root / "docs"
    folder.mkdir(exist_ok=True)
    for name, make in DOCS.items():
        (folder / name).write_text(make())


def write_key_table(root: Path) -> None:
    """Rewrite ``plateau/algorithm_keys.py``, the run config's import-free copy of every
    algorithm's keys (run before the tables that read it, in a process of its own)."""
    from strategies.registry import param_keys

    fields = {name: spec for name, (_, spec) in param_keys().items()}
    (root / "plateau" / "algorithm_keys.py").write_text(algorithm_key_table(fields))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-keys"]:
        write_key_table(Path(sys.argv[2] if len(sys.argv) > 2 else "."))
    elif sys.argv[1:2] == ["--write"]:
        write(Path(sys.argv[2] if len(sys.argv) > 2 else "."))
    else:
        for make in DOCS.values():
            print(make())
