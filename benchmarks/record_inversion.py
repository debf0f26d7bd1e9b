"""The attack of issue 31: recover each silo's record count from what a run published.

Reads a finished run's summary.json, rounds.jsonl and (optionally) a scrape of its Prometheus
endpoint, and tries every way a silo's record count n_i can be inverted from them:

* ``records``: a count published outright (num-examples of a record-only run);
* ``delta``: a silo delta of 0.01 / n_i;
* ``epsilon``: the silo's record-level epsilon, a monotone function of q = batch-size / n_i,
  inverted by bisection through the same accountant the silo used (Opacus' RDP or PRV under
  add/remove; dp-accounting's PLD under substitution).

It prints, per silo, the true n_i (recomputed from the run's own split) beside what each channel
gives back. A run that keeps n_i on the silo leaves every channel empty, or gives back only the
public size a silo declared.

    python benchmarks/record_inversion.py results/<run>
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from plateau.config import RunConfig
from plateau.data import PartitionSpec, partition_sizes


def true_sizes(config: RunConfig, clients: int) -> list[int]:
    """Each partition's record count, from the run's own (public, seeded) split."""
    spec = PartitionSpec(config.dataset, config.test_fraction, config.seed, clients,
                         config.partitioner, config.dirichlet_alpha, config.classes_per_client,
                         config.validation_fraction, config.min_partition_size)
    return [int(n) for n in partition_sizes(spec)]


def epsilon_of(records: float, batch: int, sigma: float, steps: int, delta: float,
               accountant: str, adjacency: str) -> float:
    """What a silo of ``records`` records reports after ``steps`` steps."""
    from plateau.privacy.record_dp import opacus_epsilon

    rate = batch / records
    if adjacency.startswith("substitution"):
        import dp_accounting
        from dp_accounting.pld import PLDAccountant

        event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            rate, dp_accounting.GaussianDpEvent(sigma)), steps)
        return float(PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE, 1e-3)
                     .compose(event).get_epsilon(delta))
    return opacus_epsilon([(sigma, rate, steps)], delta, accountant)


def invert_epsilon(epsilon: float, batch: int, sigma: float, steps: int, delta: float,
                   accountant: str, adjacency: str) -> int:
    """The record count whose epsilon is ``epsilon`` (epsilon falls as n grows)."""
    low, high = batch + 1.0, 1e7
    for _ in range(60):
        middle = math.sqrt(low * high)
        if epsilon_of(middle, batch, sigma, steps, delta, accountant, adjacency) > epsilon:
            low = middle
        else:
            high = middle
    return round(math.sqrt(low * high))


def attack(run: Path) -> list[dict[str, Any]]:
    """One row per silo: the true count and what each published channel gives back."""
    summary = json.loads((run / "summary.json").read_text())
    config = RunConfig.from_mapping(summary["config"])
    record = summary.get("record_privacy") or {}
    silos = record.get("silos") or {}
    queries = int(record.get("queries_per_step", 1))
    adjacency = str(record.get("adjacency", "add/remove"))
    clients = int(summary["privacy"].get("population") or record.get("population")
                  or len(silos) or 0)
    truth = true_sizes(config, clients) if clients else []
    rows = []
    for partition, size in enumerate(truth):
        report = silos.get(str(partition)) or {}
        row: dict[str, Any] = {"silo": partition, "true": size}
        if isinstance(report.get("records"), int | float) and report["records"] > 1:
            row["records"] = int(report["records"])
        delta = report.get("delta")
        if isinstance(delta, int | float) and 0 < delta < 1e-5:
            row["delta"] = round(0.01 / delta)
        epsilon, sigma, steps = (report.get(k) for k in ("epsilon", "noise_multiplier", "steps"))
        if all(isinstance(v, int | float) for v in (epsilon, sigma, steps, delta)):
            row["epsilon"] = invert_epsilon(
                float(epsilon), config.batch_size, float(sigma) / math.sqrt(queries),
                int(steps), float(delta), str(record.get("accountant", "rdp")),
                str(report.get("adjacency", adjacency)))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run's results folder")
    args = parser.parse_args()
    rows = attack(args.run)
    print("| silo | true n_i | from records | from delta | from epsilon |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['silo']} | {row['true']} | {row.get('records', '-')} | "
              f"{row.get('delta', '-')} | {row.get('epsilon', '-')} |")
    recovered = sum(any(row.get(k) == row["true"] for k in ("records", "delta", "epsilon"))
                    for row in rows)
    print(f"recovered exactly: {recovered} of {len(rows)} silos")


if __name__ == "__main__":
    main()
