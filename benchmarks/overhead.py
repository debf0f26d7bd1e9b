"""Framework overhead: the default `make run` against the same local training in plain torch.

The plain loop trains the same model on the same partitions, the same number of clients per round
and the same K steps of SGD (batch size, lr, weight decay, stability clip), averaging the updates
each round, with no Flower, no Ray and no messages. The ratio of the two wall times is how much the
federated machinery costs on this machine.

Usage: python benchmarks/overhead.py [--clients N] [--config "k=v ..."] [--skip-flower]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from plateau.data import DATASETS, client_partition, held_out_tensors
from plateau.models import build_model
from server_app.app import load_config
from server_app.launcher import app_defaults, parse_overrides

ROOT = Path(__file__).resolve().parent.parent


def plain_torch_training(config, clients: int) -> tuple[float, float]:
    """Seconds of pure local training for the whole run, and the final test accuracy."""
    info = DATASETS[config.dataset]
    parts = [
        client_partition(config.dataset, test_fraction=config.test_fraction, seed=config.seed,
                         num_partitions=clients, partition_id=i, partitioner=config.partitioner,
                         alpha=config.dirichlet_alpha,
                         classes_per_client=config.classes_per_client)
        for i in range(clients)
    ]
    model = build_model(config.model, info, norm=config.norm, width=config.model_width,
                        seed=config.seed)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(config.seed)
    cohort = max(1, round(config.sample_rate * clients))
    gen = torch.Generator().manual_seed(config.seed)
    compute = 0.0
    for _ in range(config.num_server_rounds):
        deltas = []
        for pid in rng.choice(clients, size=cohort, replace=False):
            data = parts[int(pid)]
            model.load_state_dict(global_state)
            optimizer = torch.optim.SGD(model.parameters(), lr=config.lr,
                                        weight_decay=config.weight_decay)
            started = time.perf_counter()
            for _ in range(config.local_steps):
                index = torch.randint(len(data), (min(config.batch_size, len(data)),),
                                      generator=gen)
                optimizer.zero_grad()
                F.cross_entropy(model(data.x[index]), data.y[index]).backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
            compute += time.perf_counter() - started
            deltas.append({k: v - global_state[k] for k, v in model.state_dict().items()})
        global_state = {k: v + sum(d[k] for d in deltas) / len(deltas)
                        for k, v in global_state.items()}
    test = held_out_tensors(config.dataset, test_fraction=config.test_fraction, seed=config.seed)
    model.load_state_dict(global_state)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
    return compute, accuracy


def flower_run(clients: int, config: str) -> tuple[float, dict]:
    """Wall seconds of `make run` (launcher: SuperLink start to clean-up) and its summary."""
    with tempfile.TemporaryDirectory() as out:
        overrides = f"{config} results-dir='{out}' run-name='bench'".strip()
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "server_app.launcher", "--clients", str(clients),
                        "--config", overrides], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        summary = json.loads((Path(out) / "bench" / "summary.json").read_text())
    return wall, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--config", default="")
    parser.add_argument("--skip-flower", action="store_true",
                        help="only time the plain torch loop")
    args = parser.parse_args()
    config = load_config({**app_defaults(ROOT), **parse_overrides(args.config)})
    compute, plain_accuracy = plain_torch_training(config, args.clients)
    steps = config.num_server_rounds * max(1, round(config.sample_rate * args.clients))
    print(f"plain torch: {steps} client-rounds x K={config.local_steps} steps in {compute:.2f} s "
          f"(torch threads {torch.get_num_threads()}), final accuracy {plain_accuracy:.4f}")
    if args.skip_flower:
        return
    wall, summary = flower_run(args.clients, args.config)
    loop = summary["total_time_s"]
    print(f"flwr run (make run): {wall:.1f} s end to end, ServerApp round loop {loop:.1f} s, "
          f"final accuracy {summary['final_accuracy']:.4f}")
    print(f"ratio end-to-end / plain compute: {wall / compute:.1f}x")
    print(f"ratio round loop / plain compute: {loop / compute:.1f}x")


if __name__ == "__main__":
    main()
