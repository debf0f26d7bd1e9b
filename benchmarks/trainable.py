"""Which part of a transformer to train under client-level DP, and how large a cohort it needs.

Client-level DP adds noise of std sigma*C/m to every released coordinate of the mean update
(m = expected cohort), so the noise norm grows with sqrt(d) while the signal is at most C. This
study runs MiniLM on rotten-tomatoes at one privacy budget for every ``trainable`` mode, then the
head alone over growing cohorts, each run an in-process simulation of the real apps
(``compare.py``'s worker). Printed per run: released coordinates, calibrated sigma, noise norm
on the mean (sigma*C*sqrt(d)/m, C = --clip), final and best accuracy, epsilon. Majority class:
0.589 of the held-out subset.

Usage: python benchmarks/trainable.py [--rounds 8] [--steps 5] [--epsilon 4]
       [--cohorts 10 40] [--clip 0.2] [--modes head top-k lora all] [--step-times]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compare import run_one

SAMPLE_RATE = 0.5


def released_coordinates(mode: str) -> int:
    from plateau.config import RunConfig
    from plateau.models import model_from_config

    model = model_from_config(RunConfig.from_mapping(
        {"dataset": "rotten-tomatoes", "model": "minilm", "trainable": mode}))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def step_times(modes: list[str], steps: int = 8) -> None:
    """Seconds per local step (forward + backward + update, batch 32, one client) per mode."""
    import statistics
    import time

    import torch

    from plateau.config import RunConfig
    from plateau.data import client_partition
    from plateau.local import LocalTask
    from plateau.models import input_spec, model_from_config
    from plateau.seeds import stream_generator

    print(f"{'trainable':9} {'coords':>11} {'payload MiB':>11} {'s/step':>7}  (torch threads "
          f"{torch.get_num_threads()})")
    for mode in modes:
        config = RunConfig.from_mapping({"dataset": "rotten-tomatoes", "model": "minilm",
                                         "trainable": mode, "local-steps": 1})
        model = model_from_config(config)
        data = client_partition("rotten-tomatoes", test_fraction=0.2, seed=0, num_partitions=10,
                                partition_id=0, partitioner="iid", alpha=0.5,
                                classes_per_client=2, spec=input_spec(config))
        task = LocalTask(model=model, data=data, config=config, lr=0.1,
                         generator=stream_generator(0, "client-batches", 1, 0))
        model.train()
        times = []
        for x, y in (batch for _ in range(steps + 1) for batch in task.batches()):
            start = time.perf_counter()
            task.step(task.gradients(x, y))
            times.append(time.perf_counter() - start)
        coords = sum(p.numel() for p in task.params)
        print(f"{mode:9} {coords:>11,} {coords * 4 / 2**20:>11.3f} "
              f"{statistics.median(times[1:]):>7.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--algorithm", default="fedpgn")
    parser.add_argument("--modes", nargs="+", default=["head", "top-k", "lora", "all"])
    parser.add_argument("--cohorts", nargs="+", type=int, default=[10, 40])
    parser.add_argument("--clip", type=float, default=0.2,
                        help="C, near the median head update norm (about 0.2)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the non-private head run")
    parser.add_argument("--step-times", action="store_true",
                        help="only time one local step per mode")
    args = parser.parse_args()
    if args.step_times:
        step_times(args.modes)
        return
    base = {"dataset": "rotten-tomatoes", "model": "minilm", "algorithm": args.algorithm,
            "num-server-rounds": args.rounds, "local-steps": args.steps, "lr": args.lr,
            "sample-rate": SAMPLE_RATE, "partitioner": "iid", "max-test-examples": 500,
            "clip-norm": args.clip, "trainable-layers": 2}
    dp = {"dp": "central", "target-epsilon": args.epsilon}
    plan = [(mode, args.cohorts[0], dp) for mode in args.modes]
    plan += [("head", m, dp) for m in args.cohorts[1:]]
    if not args.no_reference:
        plan += [("head", args.cohorts[0], {})]
    print(f"{'trainable':9} {'m':>4} {'dp':>4} {'coords':>10} {'sigma':>6} {'noise':>8} "
          f"{'final':>6} {'best':>6} {'eps':>6}", flush=True)
    for mode, cohort, privacy in plan:
        clients = round(cohort / SAMPLE_RATE)
        with tempfile.TemporaryDirectory() as tmp:
            rounds = run_one({**base, **privacy, "trainable": mode}, clients, Path(tmp))
            summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        coords = released_coordinates(mode)
        sigma = summary["config"]["noise-multiplier"] if privacy else 0.0
        noise = sigma * args.clip * math.sqrt(coords) / cohort
        accuracies = [r["test_accuracy"] for r in rounds]
        epsilon = summary.get("epsilon")
        print(f"{mode:9} {cohort:>4} {'on' if privacy else 'off':>4} {coords:>10,} "
              f"{sigma:>6.3f} {noise:>8.3f} {accuracies[-1]:>6.3f} {max(accuracies):>6.3f} "
              f"{epsilon if epsilon is not None else float('nan'):>6.2f}", flush=True)


if __name__ == "__main__":
    main()
