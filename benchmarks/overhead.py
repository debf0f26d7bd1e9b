"""Framework overhead: the default `make run` against the same local training in plain torch.

The plain loop trains the same model on the same partitions, the same number of clients per round
and the same K steps of SGD (batch size, lr, weight decay, stability clip), averaging the updates
each round, with no Flower, no Ray and no messages, in one torch thread: what each simulated
client (one CPU) gets. The ratio of the two wall times is how much the federated machinery costs
on this machine. (With more torch threads than free cores, torch's OpenMP threads spin against
each other: on a loaded 2-core machine two threads were 18x slower than one.)

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


def flower_run(clients: int, config: str) -> dict:
    """`make run`'s launcher, from its start to its clean-up: wall seconds, seconds until the
    console shows round 1, the summary and the round records."""
    with tempfile.TemporaryDirectory() as out:
        overrides = f"{config} results-dir='{out}' run-name='bench'".strip()
        started = time.perf_counter()
        first_round = None
        with subprocess.Popen([sys.executable, "-m", "server_app.launcher", "--clients",
                               str(clients), "--config", overrides], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if first_round is None and "[round 1/" in line:
                    first_round = time.perf_counter() - started
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"make run failed (exit {proc.returncode})")
        folder = Path(out) / "bench"
        summary = json.loads((folder / "summary.json").read_text())
        records = [json.loads(x) for x in (folder / "rounds.jsonl").read_text().splitlines()]
    return {"wall": wall, "first_round": first_round, "summary": summary, "records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--config", default="")
    parser.add_argument("--skip-flower", action="store_true",
                        help="only time the plain torch loop")
    args = parser.parse_args()
    config = load_config({**app_defaults(ROOT), **parse_overrides(args.config)})
    torch.set_num_threads(1)
    compute, plain_accuracy = plain_torch_training(config, args.clients)
    steps = config.num_server_rounds * max(1, round(config.sample_rate * args.clients))
    print(f"plain torch: {steps} client-rounds x K={config.local_steps} steps in {compute:.2f} s "
          f"(torch threads {torch.get_num_threads()}), final accuracy {plain_accuracy:.4f}")
    if args.skip_flower:
        return
    run = flower_run(args.clients, args.config)
    loop = run["summary"]["round_loop_s"]
    later = [r["wall_s"] for r in run["records"][1:]]
    later_median = float(np.median(later)) if later else float("nan")
    print(f"flwr run (make run): {run['wall']:.1f} s end to end, ServerApp round loop "
          f"{loop:.1f} s, final accuracy {run['summary']['final_accuracy']:.4f}")
    print("| measure | value |\n|---|---|")
    print(f"| end to end / plain compute | {run['wall'] / compute:.1f}x "
          f"({run['wall']:.1f} s / {compute:.2f} s) |")
    print(f"| round loop / plain compute | {loop / compute:.1f}x ({loop:.1f} s) |")
    print(f"| round 1 / median later round | {run['records'][0]['wall_s'] / later_median:.1f}x "
          f"({run['records'][0]['wall_s']:.2f} s / {later_median:.2f} s) |")
    print(f"| start to round 1 on the console | {run['first_round']:.1f} s |")


if __name__ == "__main__":
    main()
