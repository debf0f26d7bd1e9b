"""The in-run audit across noise levels: the accountant's epsilon, the canaries' one-run lower
bound and one-shot estimate, and what the canaries cost in accuracy (`make audit-study`).

Each cell is a `make run` (the launcher) of central DP-FedAvg on 100 simulated clients, q = 0.2,
30 rounds, with `audit-canaries` canaries, and the same run without canaries.

Usage: python benchmarks/audit_study.py [--sigmas 0.5 1 2] [--datasets digits fashion-mnist]
       [--clients 100] [--canaries 100] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(dataset: str, sigma: float, canaries: int, clients: int, rounds: int,
        results: Path) -> dict:
    name = f"{dataset}-{sigma:g}-{canaries}"
    config = (f"dataset='{dataset}' dp='central' noise-multiplier={sigma:g} sample-rate=0.2 "
              f"num-server-rounds={rounds} audit-canaries={canaries} results-dir='{results}' "
              f"run-name='{name}'")
    subprocess.run([sys.executable, "-m", "server_app.launcher", "--clients", str(clients),
                    "--config", config], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((results / name / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion-mnist"])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--canaries", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print("| dataset | sigma | accountant epsilon | one-run lower bound (95%) | one-shot "
          "estimate | flags | accuracy with canaries | without |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for dataset in args.datasets:
            for sigma in args.sigmas:
                audited = run(dataset, sigma, args.canaries, args.clients, args.rounds,
                              Path(folder))
                plain = run(dataset, sigma, 0, args.clients, args.rounds, Path(folder))
                audit = audited["audit"]
                estimate = audit["epsilon_estimate"]
                print(f"| {dataset} | {sigma:g} | {audited['epsilon']:.2f} | "
                      f"{audit['epsilon_lower_bound']:.2f} | "
                      f"{'n/a' if estimate is None else f'{estimate:.2f}'} | "
                      f"{', '.join(audit['flags']) or '-'} | "
                      f"{audited['final_accuracy']:.3f} | {plain['final_accuracy']:.3f} |",
                      flush=True)


if __name__ == "__main__":
    main()
