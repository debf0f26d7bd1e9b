"""Run outputs: ``rounds.jsonl`` (one object per round, flushed as it happens) and
``summary.json`` (the resolved config and the outcome)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from plateau.config import RunConfig


def default_run_name(config: RunConfig) -> str:
    """<algorithm>-<dataset>-<UTC time to the millisecond>-<pid>: two runs never share it."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"{now % 1:.3f}"[1:]
    return f"{config.algorithm}-{config.dataset}-{stamp}-{os.getpid()}"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: NaN becomes null, an infinite value (epsilon without noise) the
    string "inf", never invalid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class RunRecorder:
    """Writes a run's per-round records and its summary under ``results-dir/run-name``."""

    def __init__(self, config: RunConfig, records: list[dict[str, Any]] | None = None) -> None:
        self.config = config
        self.run_name = config.run_name or default_run_name(config)
        self.directory = Path(config.results_dir).expanduser() / self.run_name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rounds_path = self.directory / "rounds.jsonl"
        self.summary_path = self.directory / "summary.json"
        # a resumed run rewrites the records of its checkpoint (dropping any later, lost round)
        self.records: list[dict[str, Any]] = list(records or [])
        self.rounds_path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.started = time.monotonic()

    def void_epsilon(self, reason: str) -> None:
        """Null the epsilon of every record already written (rewritten atomically): a run whose
        noise turned out predictable claims no epsilon for any round."""
        for record in self.records:
            for key in ("epsilon", "epsilon_against_server", "record_epsilon",
                        "record_epsilon_min", "record_epsilon_max"):
                if key in record:
                    record[key] = None
            record["epsilon_void_reason"] = reason
        tmp = self.rounds_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        tmp.replace(self.rounds_path)

    def record_round(self, record: dict[str, Any]) -> None:
        """Append one round's record and flush it, so a crash loses at most the current round."""
        record = {k: _clean(v) for k, v in record.items()}
        self.records.append(record)
        with self.rounds_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def write_summary(self, status: str, **extra: Any) -> dict[str, Any]:
        """Write summary.json (atomically: a reader never sees half a file)."""
        accuracies = [(r["test_accuracy"], r["round"]) for r in self.records
                      if r.get("test_accuracy") is not None]
        best = max(accuracies, default=(None, None))
        summary = {
            "run_name": self.run_name,
            "status": status,
            "rounds_completed": len(self.records),
            "final_accuracy": self.records[-1]["test_accuracy"] if self.records else None,
            "best_accuracy": best[0],
            "best_round": best[1],
            "total_time_s": round(time.monotonic() - self.started, 3),
            **{k: _clean(v) for k, v in extra.items()},
            "config": self.config.to_dict(),
        }
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.summary_path)
        return summary
