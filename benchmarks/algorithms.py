"""Per-round cost of each algorithm relative to FedAvg, on the same partitions, in one process.

One round = the server's configure_train, every sampled client's local rule and release (the
ClientApp's code path, run in turn), and the server's aggregate_train. Rounds of the algorithms
are interleaved so that machine noise hits them alike; the medians are compared.

Usage: python benchmarks/algorithms.py [--rounds 12] [--clients 20] [--config "k=v ..."]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client_app.compute import client_round
from plateau.config import RunConfig
from plateau.data import DATASETS, client_partition
from plateau.flower_compat import local_grid_names
from plateau.messages import tensors_record
from plateau.models import build_model
from plateau.seeds import stream_generator
from server_app.app import build_strategy, load_config
from server_app.launcher import app_defaults, parse_overrides
from strategies import STRATEGIES, PlateauStrategy

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = [("fedavg", {}), ("fedpgn", {}), ("fednsam", {}),
              ("fedpgn", {"pgn-form": "perturb"}), ("fednsam", {"nsam-form": "code"}),
              *[(name, {}) for name in STRATEGIES if name not in ("fedavg", "fedpgn", "fednsam")]]


class Nodes:
    """A Grid stand-in: N connected nodes, node i holds partition i - 1 (and says so when the
    server asks)."""

    def __init__(self, count: int) -> None:
        self.ids = list(range(1, count + 1))

    def get_node_ids(self) -> list[int]:
        return self.ids

    def push_messages(self, messages: list[Message]) -> list[str]:
        for message in messages:  # an id, as the SuperLink gives one to every message it takes
            local_grid_names().stamp(message, f"bench-{id(message)}")
        self.answers = self.send_and_receive(messages)
        return [answer.metadata.reply_to_message_id for answer in self.answers]

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        answers, self.answers = self.answers, []
        return answers

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        return [Message(RecordDict({"identity": MetricRecord(
            {"partition-id": m.metadata.dst_node_id - 1, "num-partitions": len(self.ids)})}),
            reply_to=m) for m in messages]


def one_round(strategy: PlateauStrategy, config: RunConfig, server_round: int,
              arrays: ArrayRecord, nodes: Nodes, model: torch.nn.Module,
              states: dict[int, dict]) -> ArrayRecord:
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), nodes))
    replies = []
    for message in messages:
        pid = message.metadata.dst_node_id - 1
        data = client_partition(config.dataset, test_fraction=config.test_fraction,
                                seed=config.seed, num_partitions=len(nodes.ids), partition_id=pid,
                                partitioner=config.partitioner, alpha=config.dirichlet_alpha,
                                classes_per_client=config.classes_per_client)
        content, _ = client_round(
            message.content, config, model, data, state=states.setdefault(pid, {}),
            generator=stream_generator(config.seed, "client-batches", server_round, pid),
            num_partitions=len(nodes.ids))
        replies.append(Message(content=content, reply_to=message))
    new_arrays, _ = strategy.aggregate_train(server_round, replies)
    return new_arrays if new_arrays is not None else arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--config", default="")
    args = parser.parse_args()
    local_grid_names().set_task_identity(1, 0, 1)
    base = {**app_defaults(ROOT), **parse_overrides(args.config)}
    nodes = Nodes(args.clients)
    runs = []
    for algorithm, extra in ALGORITHMS:
        config = load_config({**base, "algorithm": algorithm, **extra})
        strategy = build_strategy(config)
        model = build_model(config.model, DATASETS[config.dataset], norm=config.norm,
                            width=config.model_width)
        arrays = tensors_record(strategy.current)
        label = algorithm + "".join(f" {k}={v}" for k, v in extra.items())
        runs.append({"label": label, "config": config, "strategy": strategy, "model": model,
                     "arrays": arrays, "times": [], "states": {}})
    one_round(runs[0]["strategy"], runs[0]["config"], 1, runs[0]["arrays"], nodes,
              runs[0]["model"], {})  # warm-up: data split and caches
    for server_round in range(1, args.rounds + 1):
        for run in runs:
            started = time.perf_counter()
            run["arrays"] = one_round(run["strategy"], run["config"], server_round, run["arrays"],
                                      nodes, run["model"], run["states"])
            run["times"].append(time.perf_counter() - started)
    reference = statistics.median(runs[0]["times"])
    print(f"{args.rounds} rounds each, {args.clients} clients, sample-rate "
          f"{runs[0]['config'].sample_rate}, K={runs[0]['config'].local_steps}, "
          f"torch threads {torch.get_num_threads()}")
    for run in runs:
        median = statistics.median(run["times"])
        print(f"{run['label']:<28} median round {median * 1000:8.1f} ms   "
              f"ratio to fedavg {median / reference:5.2f}x")


if __name__ == "__main__":
    main()
