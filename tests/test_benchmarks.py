"""The benchmark scripts still run (a tiny configuration, not a timing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_algorithm_cost_benchmark_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/algorithms.py", "--rounds", "1", "--clients", "4",
         "--config", "local-steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fednsam" in proc.stdout and "ratio to fedavg" in proc.stdout


def test_overhead_benchmark_plain_loop_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/overhead.py", "--skip-flower", "--clients", "4",
         "--config", "num-server-rounds=2 local-steps=2"], cwd=ROOT, capture_output=True,
        text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("plain torch: 4 client-rounds x K=2 steps")
