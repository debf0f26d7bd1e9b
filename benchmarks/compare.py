"""The study behind the closing notes: DP-FedAvg vs DP-FedPGN, FedAvg vs FedNSAM, several seeds.

Every run is an in-process Flower simulation (Ray backend) of the real ServerApp and ClientApp,
each in its own subprocess. Reported per method (mean +- std over seeds): final and best test
accuracy, mean clip fraction, and the first round reaching the reference accuracy (FedAvg's final
accuracy of the same seed).

Usage: python benchmarks/compare.py [--seeds 0 1 2] [--rounds 30] [--clients 20] [--alpha 0.1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from strategies import STRATEGIES

STUDIES = {
    "dp": [
        ("DP-FedAvg  C=1.0", {"algorithm": "fedavg", "dp": "central", "clip-norm": 1.0}),
        ("DP-FedPGN  C=1.0", {"algorithm": "fedpgn", "dp": "central", "clip-norm": 1.0}),
        ("DP-FedAvg  C=0.3", {"algorithm": "fedavg", "dp": "central", "clip-norm": 0.3}),
        ("DP-FedPGN  C=0.3", {"algorithm": "fedpgn", "dp": "central", "clip-norm": 0.3}),
    ],
    "nsam": [
        ("FedAvg", {"algorithm": "fedavg"}),
        ("FedNSAM", {"algorithm": "fednsam"}),
    ],
    "baselines": [(name, {"algorithm": name}) for name in STRATEGIES],
    "baselines-dp": [(name, {"algorithm": name, "dp": "central"}) for name in STRATEGIES],
}


def simulate(config: dict, clients: int) -> None:
    """Worker mode: one in-process simulation with this run config."""
    from flwr.simulation import run_simulation

    from client_app.app import app as client_app
    from server_app.app import build_server_app

    run_simulation(server_app=build_server_app(config), client_app=client_app,
                   num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2}})


def run_one(config: dict, clients: int, folder: Path) -> list[dict]:
    config = {**config, "results-dir": str(folder), "run-name": "run"}
    subprocess.run([sys.executable, __file__, "--worker", json.dumps(config), "--clients",
                    str(clients)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    lines = (folder / "run" / "rounds.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def first_round_reaching(rounds: list[dict], target: float) -> int | None:
    return next((r["round"] for r in rounds if r["test_accuracy"] >= target - 1e-12), None)


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--noise", type=float, default=0.8)
    parser.add_argument("--model", default="cnn", help="the flatness claims are about deep nets")
    parser.add_argument("--study", choices=sorted(STUDIES), nargs="+", default=sorted(STUDIES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        simulate(json.loads(args.worker), args.clients)
        return
    common = {"num-server-rounds": args.rounds, "partitioner": "dirichlet",
              "dirichlet-alpha": args.alpha, "noise-multiplier": args.noise,
              "model": args.model}
    print(f"digits, model {args.model}, {args.clients} clients, Dirichlet alpha={args.alpha}, "
          f"{args.rounds} rounds, "
          f"seeds {args.seeds}, sigma={args.noise} (DP runs), other keys at their defaults")
    for study in args.study:
        results: dict[str, list[list[dict]]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for label, extra in STUDIES[study]:
                for seed in args.seeds:
                    folder = Path(tmp) / f"{label.replace(' ', '_')}-{seed}"
                    config = {**common, **extra, "seed": seed}
                    results.setdefault(label, []).append(run_one(config, args.clients, folder))
        reference = STUDIES[study][0][0]
        targets = [runs[-1]["test_accuracy"] for runs in results[reference]]
        print(f"\n[{study}] target = final accuracy of {reference.strip()} of the same seed")
        for label, runs in results.items():
            final = [r[-1]["test_accuracy"] for r in runs]
            best = [max(x["test_accuracy"] for x in r) for r in runs]
            clip = [statistics.mean(x["clip_fraction"] for x in r) for r in runs
                    if r[0].get("clip_fraction") is not None]
            reach = [first_round_reaching(r, t) for r, t in zip(runs, targets, strict=True)]
            reached = [x for x in reach if x is not None]
            print(f"  {label:<18} final {fmt(final)}  best {fmt(best)}  clip fraction "
                  f"{fmt(clip, 2)}  rounds to target {reach} (mean "
                  f"{statistics.mean(reached) if reached else float('nan'):.1f})")


if __name__ == "__main__":
    main()
