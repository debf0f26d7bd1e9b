"""Cross-silo learning under record-level DP: final accuracy per algorithm and per-silo epsilon.

Five silos of Fashion-MNIST (Dirichlet alpha 0.5), the `cnn` model, every silo in every round;
for each algorithm (FedAvg, DP-FedPGN, FedNSAM) a run without DP and runs where each silo
calibrates its own noise to record-level epsilon 8, 2 and 1 at delta 1e-6. In-process
simulations; each finished cell is stored in ``--out`` (JSON) and never rerun, so an interrupted
study resumes. Prints a Markdown table.

    python benchmarks/record_study.py [--rounds 20] [--out results/record-study.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

ALGORITHMS = ("fedavg", "fedpgn", "fednsam")
EPSILONS = (0.0, 8.0, 2.0, 1.0)  # 0 = no DP
BASE = {"dataset": "fashion-mnist", "model": "cnn", "model-width": 16, "partitioner": "dirichlet",
        "dirichlet-alpha": 0.5, "sample-rate": 1.0, "batch-size": 256, "local-steps": 5,
        "record-delta": 1e-6}
LR = {"off": 0.5, "on": 2.0}  # clipped per-record gradients (norm <= 1) take a larger step


def cell_config(algorithm: str, epsilon: float, rounds: int) -> dict[str, Any]:
    private = epsilon > 0
    config = {**BASE, "algorithm": algorithm, "num-server-rounds": rounds,
              "lr": LR["on" if private else "off"]}
    if private:
        config |= {"record-dp": "on", "record-target-epsilon": epsilon}
    return config


def simulated_run(config: dict[str, Any], clients: int
                  ) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """One in-process simulation of ``config``: its summary.json, rounds.jsonl and wall time
    (shared with benchmarks/local_silos.py)."""
    from flwr.simulation import run_simulation

    from client_app.app import app as client_app
    from server_app.app import build_server_app

    with tempfile.TemporaryDirectory() as folder:
        started = time.monotonic()
        run_simulation(
            server_app=build_server_app({**config, "results-dir": folder, "run-name": "cell",
                                         "checkpoint": False}),
            client_app=client_app, num_supernodes=clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": 2}})
        wall = time.monotonic() - started
        run = Path(folder) / "cell"
        if not (run / "summary.json").is_file():
            raise SystemExit(f"the simulation wrote no summary.json (config {config})")
        summary = json.loads((run / "summary.json").read_text())
        rounds = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    return summary, rounds, wall


def run_cell(config: dict[str, Any], silos: int) -> dict[str, Any]:
    summary, rounds, wall = simulated_run(config, silos)
    record = summary.get("record_privacy") or {}
    return {"final_accuracy": summary["final_accuracy"], "best_accuracy": summary["best_accuracy"],
            "accuracy_by_round": [r["test_accuracy"] for r in rounds],
            "epsilon_min": record.get("epsilon_min"), "epsilon_max": record.get("epsilon_max"),
            "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--silos", type=int, default=5)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--epsilons", default=",".join(str(e) for e in EPSILONS))
    parser.add_argument("--out", type=Path, default=Path("results/record-study.json"))
    args = parser.parse_args()
    cells = json.loads(args.out.read_text()) if args.out.exists() else {}
    for algorithm in args.algorithms.split(","):
        for epsilon in (float(e) for e in args.epsilons.split(",")):
            config = cell_config(algorithm, epsilon, args.rounds)
            key = json.dumps(config, sort_keys=True)
            if key not in cells:
                cells[key] = {"config": config, **run_cell(config, args.silos)}
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(cells, indent=1))
    print(f"record-level DP, {args.silos} silos, Fashion-MNIST Dirichlet 0.5, cnn width 16, "
          f"batch 256, K=5, {args.rounds} rounds, delta 1e-6 per silo")
    print("| algorithm | record epsilon target | final acc | best acc | silo epsilon min-max "
          "| wall (s) |")
    print("|---|---|---|---|---|---|")
    for cell in cells.values():
        config = cell["config"]
        target = config.get("record-target-epsilon", "no DP")
        spent = ("-" if cell["epsilon_min"] is None
                 else f"{cell['epsilon_min']:.2f}-{cell['epsilon_max']:.2f}")
        print(f"| {config['algorithm']} | {target} | {cell['final_accuracy']:.3f} | "
              f"{cell['best_accuracy']:.3f} | {spent} | {cell['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
