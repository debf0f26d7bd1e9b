"""What a run costs beyond its compute, against the targets of the simulation/deployment issue.

One table, each row measured here and now:
- the default ``make run`` (20 clients, 20 rounds, ``linear``) against the same training in plain
  torch (``overhead.py``): end to end and round-loop ratios, round 1 against a later round, start
  to round 1 on the console;
- the same for a compute-dominated config (``--heavy``, the issue's ``cnn`` with K = 50);
- 1k / 5k / 10k simulated clients, iid Fashion-MNIST, 5 rounds (``scale.py``): time and peak RSS;
- the real TLS deployment of ``tests/test_deployment.py`` (a SuperLink, two SuperNodes with warm
  trainers, FedSMOO, central DP) against the same config simulated with two clients: the
  per-round overhead of a deployment.

Usage: python benchmarks/runtime.py [--heavy] [--populations 1000 5000 10000 | --populations]
       [--deployments 3] [--repeats 3] [--clients 20] [--config "k=v ..."]
       python benchmarks/runtime.py --deployment-variants 2

``--populations`` with no sizes and ``--deployments 0`` leave those rows out.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from overhead import flower_run, plain_torch_training
from scale import run as population_run

from plateau.config import RunConfig
from server_app.app import load_config
from server_app.launcher import app_defaults, parse_overrides

ROOT = Path(__file__).resolve().parent.parent
HEAVY = "model='cnn' local-steps=50 num-server-rounds=10"
DEPLOYED = "algorithm='fedsmoo' dp='central' noise-multiplier=0.8 sample-rate=1.0"
ROUND_WALLS = re.compile(r"round wall times \[([^\]]*)\]")


def resolved(config: str) -> RunConfig:
    return load_config({**app_defaults(ROOT), **parse_overrides(config)})


def overhead_rows(label: str, clients: int, config: str, repeats: int,
                  start_target_s: float | None = 15.0) -> list[tuple[str, str, str, bool | None]]:
    """End to end and round loop against plain torch, round 1 against later, start to round 1
    (against ``start_target_s``, if any: the issue sets it for the default run only); each the
    median of ``repeats`` launches, the range in brackets."""
    torch.set_num_threads(1)  # what each simulated client gets: one CPU
    compute, _ = plain_torch_training(resolved(config), clients)
    runs = [flower_run(clients, config) for _ in range(repeats)]

    def spread(values: list[float], digits: int) -> tuple[float, str]:
        middle = statistics.median(values)
        text = f"{middle:.{digits}f} s"
        return middle, (text if len(values) == 1 else
                        f"{text} [{min(values):.{digits}f}-{max(values):.{digits}f}]")

    wall, wall_text = spread([r["wall"] for r in runs], 1)
    loop, loop_text = spread([r["summary"]["round_loop_s"] for r in runs], 1)
    first, first_text = spread([r["records"][0]["wall_s"] for r in runs], 2)
    later, later_text = spread([statistics.median(x["wall_s"] for x in r["records"][1:])
                                for r in runs], 2)
    start, start_text = spread([r["first_round"] for r in runs], 1)
    return [
        (f"{label}: end to end / plain compute", "<= 3x",
         f"{wall / compute:.1f}x ({wall_text} / {compute:.2f} s)", wall <= 3 * compute),
        (f"{label}: round loop / plain compute", "-", f"{loop / compute:.1f}x ({loop_text})",
         None),
        (f"{label}: round 1 / median later round", "<= 3x",
         f"{first / later:.1f}x ({first_text} / {later_text})", first <= 3 * later),
        (f"{label}: start to round 1 on the console",
         "-" if start_target_s is None else f"<= {start_target_s:g} s", start_text,
         None if start_target_s is None else start <= start_target_s),
    ]


def population_rows(sizes: list[int]) -> list[tuple[str, str, str, bool | None]]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for clients in sizes:
            r = population_run(clients, 5, Path(folder))
            rows.append((f"{clients:,} clients, iid Fashion-MNIST, 5 rounds", "completes",
                         f"{r['wall_s']:.0f} s end to end, later rounds {r['round_s']:.2f} s, "
                         f"peak RSS {r['peak_rss_mib']:.0f} MiB", r["rounds"] == 5))
    return rows


# the deployment test's knobs (tests/test_deployment.py): the ClientApps' SuperExec, the pulls'
# pacing (plateau.flower_compat) and the packed wire form (plateau.messages), each turned off
# alone and all together, on the deployment's SuperLink database file
VARIANTS = {
    "fork-server, pacing, packing (as shipped)": {},
    "without packing": {"PLATEAU_PACK_ARRAYS": "0"},
    "without pacing": {"PLATEAU_PACE_PULLS": "0"},
    "without the fork-server (Flower's SuperExec)": {"PLATEAU_FORK_SERVER": "0"},
    "without any of the three": {"PLATEAU_PACK_ARRAYS": "0", "PLATEAU_PACE_PULLS": "0",
                                 "PLATEAU_FORK_SERVER": "0"},
    "as shipped, in-memory SuperLink database": {
        "PLATEAU_SUPERLINK_DATABASE": ":flwr-in-memory:"},
}


def deployed_round_walls(repeats: int, env: dict[str, str] | None = None) -> list[float]:
    """Round wall times of the real TLS deployment test, ``repeats`` runs of two rounds."""
    walls: list[float] = []
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
             "tests/test_deployment.py", "-k", "tls"], cwd=ROOT, capture_output=True, text=True,
            timeout=900, check=False, env={**os.environ, **(env or {})})
        found = ROUND_WALLS.search(proc.stdout)
        if proc.returncode != 0 or found is None:
            raise SystemExit(f"the deployment test failed:\n{proc.stdout[-3000:]}")
        walls += [float(x) for x in found[1].split(",")]
    return walls


def deployment_rows(repeats: int) -> list[tuple[str, str, str, bool | None]]:
    """The deployment's median round against the same rounds simulated with two clients."""
    deployed = deployed_round_walls(repeats)
    simulated = [r["wall_s"] for r in
                 flower_run(2, f"{DEPLOYED} num-server-rounds={2 * repeats}")["records"]]
    gap = statistics.median(deployed) - statistics.median(simulated)
    return [("deployment round (TLS, 2 SuperNodes, FedSMOO, central DP) above the simulated "
             "round", "<= 2 s",
             f"{gap:.2f} s (deployed {', '.join(f'{w:.2f}' for w in deployed)} s; simulated "
             f"median {statistics.median(simulated):.2f} s)", gap <= 2.0)]


def variant_rows(repeats: int) -> list[tuple[str, str, str, bool | None]]:
    """The deployed round under each variant, runs interleaved (load drifts alike), medians."""
    walls: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, env in VARIANTS.items():
            walls[name] += deployed_round_walls(1, env)
    return [(f"deployed round: {name}", "-",
             f"median {statistics.median(w):.2f} s ({', '.join(f'{x:.2f}' for x in w)})", None)
            for name, w in walls.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--config", default="", help='run-config overrides of the default row')
    parser.add_argument("--heavy", action="store_true",
                        help=f"also the compute-dominated config ({HEAVY})")
    parser.add_argument("--populations", type=int, nargs="*", default=[1000, 5000, 10000])
    parser.add_argument("--repeats", type=int, default=3,
                        help="launches per simulated row (medians, ranges in brackets)")
    parser.add_argument("--deployments", type=int, default=3,
                        help="runs of the two-round deployment test (0: leave the row out)")
    parser.add_argument("--deployment-variants", type=int, default=0, metavar="RUNS",
                        help="only the deployed round with and without the fork-server "
                        "SuperExec, the pacing and the packing (and in memory), RUNS runs of "
                        "each")
    args = parser.parse_args()
    if args.deployment_variants:
        print("| measure | target | now | met |\n|---|---|---|---|")
        for measure, target, value, _ in variant_rows(args.deployment_variants):
            print(f"| {measure} | {target} | {value} | - |")
        return
    rows = overhead_rows("default", args.clients, args.config, args.repeats)
    if args.heavy:
        rows += overhead_rows("compute-dominated", args.clients, HEAVY, args.repeats,
                              start_target_s=None)
    if args.deployments:
        rows += deployment_rows(args.deployments)
    rows += population_rows(args.populations)
    print(f"{len(os.sched_getaffinity(0))} CPUs, torch {torch.__version__}")
    print("| measure | target | now | met |\n|---|---|---|---|")
    for measure, target, value, met in rows:
        verdict = "-" if met is None else "yes" if met else "no"
        print(f"| {measure} | {target} | {value} | {verdict} |")


if __name__ == "__main__":
    main()
