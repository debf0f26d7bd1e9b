"""The benchmark scripts still run (a tiny configuration, not a timing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_algorithm_cost_benchmark_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/algorithms.py", "--rounds", "1", "--clients", "4",
         "--config", "local-steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fednsam" in proc.stdout and "ratio to fedavg" in proc.stdout


@pytest.mark.slow
def test_overhead_benchmark_plain_loop_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/overhead.py", "--skip-flower", "--clients", "4",
         "--config", "num-server-rounds=2 local-steps=2"], cwd=ROOT, capture_output=True,
        text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("plain torch: 4 client-rounds x K=2 steps")


@pytest.mark.e2e
def test_runtime_table_runs(tmp_path: Path) -> None:
    """The issue table's script, its default rows only, on a tiny run through `make run` (with
    a Flower home of its own: other tests' `flwr run`s may run beside it)."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/runtime.py", "--clients", "4", "--config",
         "num-server-rounds=3 local-steps=2", "--populations", "--deployments", "0",
         "--repeats", "1"], cwd=ROOT, env={**os.environ, "FLWR_HOME": str(tmp_path / "flwr")},
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    measures = [line.split(" | ")[0] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert measures == ["| measure", "| default: end to end / plain compute",
                        "| default: round loop / plain compute",
                        "| default: round 1 / median later round",
                        "| default: start to round 1 on the console"]
