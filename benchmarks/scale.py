"""Large simulated populations through `make run`'s launcher: wall time and peak memory.

Each size N runs iid Fashion-MNIST (the Debian package) with about 100 clients per round
(q = 100/N), `linear`, K = 5, 5 rounds. Peak memory is the largest sum, over one-second samples,
of the resident set sizes of every process the launch started (the launcher's environment marks
them, Ray's workers included), so shared memory-mapped pages count once per process: an upper
bound on what the machine needs.

Usage: python benchmarks/scale.py [--clients 1000 5000 10000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tree_rss_mib(home: Path) -> float:
    """Resident memory of every process carrying FLWR_HOME=home in its environment, MiB."""
    marker = f"FLWR_HOME={home}".encode()
    total = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "status").read_text()
                total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
        except (OSError, AttributeError):
            continue
    return total / 1024


def run(clients: int, rounds: int, results: Path) -> dict[str, float]:
    home = results / f"flwr-home-{clients}"
    config = (f"dataset='fashion-mnist' partitioner='iid' model='linear' local-steps=5 "
              f"sample-rate={min(1.0, 100 / clients):g} num-server-rounds={rounds} "
              f"results-dir='{results}' run-name='n{clients}'")
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            peak[0] = max(peak[0], tree_rss_mib(home))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "server_app.launcher", "--clients", str(clients),
                           "--timeout", "7200", "--config", config], cwd=ROOT,
                          env={**os.environ, "FLWR_HOME": str(home)}, capture_output=True,
                          text=True, check=False)
    wall = time.monotonic() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"N={clients} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    records = [json.loads(x) for x in (results / f"n{clients}" / "rounds.jsonl").read_text()
               .splitlines()]
    start_to_round_1 = re.search(r"\[round 1/", proc.stdout)
    return {"clients": clients, "wall_s": wall, "peak_rss_mib": peak[0],
            "round_s": sum(r["wall_s"] for r in records[1:]) / max(1, len(records) - 1),
            "round_1_s": records[0]["wall_s"], "final_accuracy": records[-1]["test_accuracy"],
            "rounds": len(records), "ok": start_to_round_1 is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("| clients | end to end (s) | round 1 (s) | later rounds (s) | peak RSS (MiB) | "
          "final accuracy |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for clients in args.clients:
            r = run(clients, args.rounds, Path(folder))
            print(f"| {clients:,} | {r['wall_s']:.1f} | {r['round_1_s']:.2f} | "
                  f"{r['round_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['final_accuracy']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
