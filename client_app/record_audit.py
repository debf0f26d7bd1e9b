"""The record-level audit (part of ``make audit``): one record more or less in a silo, and
everything the silo publishes, as the attacker sees it.

Each trial runs the silo's real round (``client_app.compute.train_on``: its node policy, plan,
ledger, Poisson-sampled DP-SGD steps, release and reply) on records the audit chooses: ordinary
records, and in world 1 a canary record whose clipped gradient points along one weight. In world
0 the canary is absent (add/remove) or replaced by an ordinary record (substitution): the
neighbour the silo's own reply says its epsilon holds for (``record-substitution``). The
attacker scores every number of the reply (num-examples and each record-level figure the silo
reports) and the update's projection on the canary's gradient; half of the trials choose the
best test, the other half bound its error rates (``plateau.privacy.audit.held_out_bound``).

The lower bound must stay below the epsilon the silo reports. Two broken silos must be flagged:
what main 755c58a did (q and delta from the silo's own record count, published, while the
epsilon was accounted under add/remove: one record more changes num-examples, and the attacker
wins every trial), and a silo whose noise is 10x below its plan (the update gives it away).

    python -m client_app.record_audit [--trials N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from plateau import messages
from plateau.config import RunConfig
from plateau.data import Tensors as DataTensors
from plateau.models import model_from_config
from plateau.privacy import record_dp
from plateau.privacy.audit import ScaledSource, held_out_bound
from plateau.privacy.noise import TEST_SEED_ENV, NoiseSource, test_seed

from . import compute

CANARY_PIXEL = 50.0  # the canary's one bright pixel: its gradient is clipped to C


@dataclass(frozen=True)
class RecordAuditSetup:
    """One silo's round in the two neighbouring worlds."""

    name: str
    records: int = 20  # ordinary records in world 0 (add/remove) or in both (substitution)
    batch_size: int = 8
    noise_multiplier: float = 1.5
    local_steps: int = 1
    node: tuple[tuple[str, object], ...] = ()  # the silo's node config
    old_accounting: bool = False  # broken: add/remove claimed with q and delta from n_i
    noise_scale: float = 1.0  # broken below 1: the noise drawn is this times the planned
    trials: int = 1000  # per world
    confidence: float = 0.95

    def config(self) -> RunConfig:
        return RunConfig.from_mapping({
            "dataset": "digits", "model": "linear", "record-dp": "on", "lr": 1.0,
            "record-noise-multiplier": self.noise_multiplier, "batch-size": self.batch_size,
            "local-steps": self.local_steps, "num-server-rounds": 1, "grad-clip": 1e6})


@dataclass(frozen=True)
class RecordAuditResult:
    setup: RecordAuditSetup
    adjacency: str
    epsilon_lower_bound: float
    reported_epsilon: float
    statistic: str
    seconds: float

    @property
    def flagged(self) -> bool:
        return self.epsilon_lower_bound > self.reported_epsilon


def _records(setup: RecordAuditSetup, world: str) -> DataTensors:
    """``records`` ordinary records (a dark image of class 0), and in world 1 the canary (one
    bright pixel, class 1) beside them; substitution's world 0 has one more ordinary record."""
    count = setup.records + (world in ("canary", "substitute"))
    x = torch.zeros(count, 1, 8, 8)
    y = torch.zeros(count, dtype=torch.long)
    if world == "canary":
        x[-1, 0, 0, 0], y[-1] = CANARY_PIXEL, 1
    return DataTensors(x, y)


def _canary_direction(config: RunConfig) -> dict[str, torch.Tensor]:
    """The unit direction a canary-only step moves the model in (minus its gradient), by
    parameter name."""
    model = model_from_config(config)
    data = _records(dataclasses.replace(RecordAuditSetup("direction"), records=0), "canary")
    loss = torch.nn.functional.cross_entropy(model(data.x), data.y)
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(named.values()))
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    return {name: -g.double() / norm for name, g in zip(named, grads, strict=True)}


@contextlib.contextmanager
def _broken(setup: RecordAuditSetup) -> Iterator[None]:
    """The silo broken as the setup says: main 755c58a's accounting (q and delta from its own
    count, epsilon under add/remove), or noise scaled below what it accounts for."""
    real_plan, real_source = compute.plan_for, compute.secure_source

    def old_plan(config: RunConfig, records: int, queries: int,
                 policy: object = record_dp.NO_POLICY) -> record_dp.RecordPlan:
        plan = real_plan(config, records, queries, policy)  # type: ignore[arg-type]
        return dataclasses.replace(plan, adjacency=record_dp.ADD_REMOVE,
                                   accountant=config.record_accountant)

    def weak_source(*labels: object) -> NoiseSource:
        return ScaledSource(real_source(*labels), setup.noise_scale)

    if setup.old_accounting:
        compute.plan_for = old_plan  # type: ignore[assignment]
    if setup.noise_scale != 1.0:
        compute.secure_source = weak_source  # type: ignore[assignment]
    try:
        yield
    finally:
        compute.plan_for, compute.secure_source = real_plan, real_source


def _silo_round(setup: RecordAuditSetup, content: RecordDict, data: DataTensors,
                direction: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The silo's round from a fresh ledger: every number of its reply, and its update's
    projection on the canary's direction."""
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "num-partitions": 1, **dict(setup.node)})
    reply = compute.train_on(content, context, data)
    update = reply[messages.UPDATE_KEY].to_torch_state_dict()
    projection = sum(float((update[k].double() * d).sum()) for k, d in direction.items())
    return {**{k: float(v) for k, v in reply[messages.METRICS_KEY].items()},
            "canary-projection": projection}


def run_record_audit(setup: RecordAuditSetup) -> RecordAuditResult:
    """Play the game ``setup.trials`` times per world; the held-out lower bound against the
    largest epsilon the silo reported in either world."""
    if test_seed() is not None:
        raise RuntimeError(f"{TEST_SEED_ENV} is set: the silo's noise would repeat; unset it")
    started = time.monotonic()
    config = setup.config()
    model = model_from_config(config)
    content = RecordDict({messages.MODEL_KEY: ArrayRecord(model.state_dict()),
                          messages.CONFIG_KEY: ConfigRecord({
                              **config.to_dict(), "server-round": 1, "round-lr": config.lr,
                              "local-rule": "sgd", "expected-cohort": 1.0})})
    direction = _canary_direction(config)
    with _broken(setup):
        first = _silo_round(setup, content, _records(setup, "canary"), direction)
        adjacency = ("substitution" if first.get("record-substitution", 1) else "add/remove")
        neighbour = "substitute" if adjacency == "substitution" else "absent"
        scores: dict[str, dict[str, list[float]]] = {"1": {}, "0": {}}
        reported = []
        for world, kind in (("1", "canary"), ("0", neighbour)):
            data = _records(setup, kind)
            for _ in range(setup.trials):
                reply = _silo_round(setup, content, data, direction)
                reported.append(reply.get("record-epsilon", np.inf))
                for key, value in reply.items():
                    scores[world].setdefault(key, []).append(value)
    test = held_out_bound({k: np.asarray(v) for k, v in scores["1"].items()},
                          {k: np.asarray(v) for k, v in scores["0"].items()},
                          delta=max(_delta(setup, config), 0.0), confidence=setup.confidence)
    return RecordAuditResult(setup, adjacency, test.epsilon_lower_bound, max(reported),
                             test.statistic, time.monotonic() - started)


def _delta(setup: RecordAuditSetup, config: RunConfig) -> float:
    """The delta the silo reports at (its default for the audit's record count)."""
    return record_dp.silo_delta(config, setup.records)


RECORD_REAL_CASES: tuple[RecordAuditSetup, ...] = (
    RecordAuditSetup("count on the silo: substitution"),
    RecordAuditSetup("record-public-size 16: add/remove", node=(("record-public-size", 16),)),
)
RECORD_BROKEN_CASES: tuple[RecordAuditSetup, ...] = (
    RecordAuditSetup("old: count published, add/remove claimed", old_accounting=True),
    RecordAuditSetup("noise scaled down 10x", noise_multiplier=3.0, noise_scale=0.1),
)


def main(argv: Sequence[str] | None = None) -> int:
    """The record-level half of ``make audit``."""
    parser = argparse.ArgumentParser(description="Audit record-level DP in a silo.")
    parser.add_argument("--trials", type=int, default=1000, help="trials per world")
    args = parser.parse_args(argv)
    wrong = []
    print("| silo | adjacency claimed | trials/world | lower bound | reported epsilon | flagged |")
    print("|---|---|---|---|---|---|")
    for cases, must_flag in ((RECORD_REAL_CASES, False), (RECORD_BROKEN_CASES, True)):
        for setup in cases:
            result = run_record_audit(dataclasses.replace(setup, trials=args.trials))
            print(f"| {setup.name} | {result.adjacency} | {args.trials} | "
                  f"{result.epsilon_lower_bound:.2f} | {result.reported_epsilon:.2f} | "
                  f"{'**yes**' if result.flagged else 'no'} |  ({result.statistic}; "
                  f"{result.seconds:.0f} s)", flush=True)
            if result.flagged != must_flag:
                wrong.append(setup.name)
    if wrong:
        print(f"record audit FAILED: {', '.join(wrong)}")
        return 1
    print("record audit passed: the silo stays below its epsilon; the old accounting is flagged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
