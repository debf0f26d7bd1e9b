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

# Every key a round's line of rounds.jsonl may carry, and what it means (docs/outputs.md is made
# from these; tests check that a run's files use no other key). Under DP, the keys listed in
# summary.json's privacy.outside_epsilon are operator telemetry that no epsilon covers.
ROUND_KEYS: dict[str, str] = {
    "round": "the server round (1-based)",
    "test_accuracy": "accuracy of the new global model: central, on the held-out split (with "
                     "dataset='local', the server's test-data file); else the federated one "
                     "(null in rounds without it)",
    "test_loss": "the loss on the same examples",
    "federated_accuracy": "dataset='local', every evaluate-every rounds and after the last: "
                          "accuracy on the silos' held-out records, weighted by their examples",
    "federated_loss": "the mean loss on the same records",
    "federated_examples": "the held-out records the accepted evaluations covered",
    "federated_silos": "each silo's accuracy, loss and examples",
    "federated_declined": "the silos that declined the evaluation, by reason",
    "federated_rejected": "the silos whose evaluation screening refused, with the reason",
    "train_loss": "mean over the replying clients of their local-step losses (null under DP "
                  "outside central placement, and under record-level DP)",
    "num_clients": "replies aggregated",
    "num_sampled": "clients sampled",
    "num_failed": "clients that replied with an error",
    "num_rejected": "replies dropped by screening",
    "rejected": "the dropped replies by reason",
    "num_declined": "sampled clients that declined the round",
    "declined": "the declines by reason (no-data, record-budget)",
    "lr": "the round's local learning rate",
    "global_update_norm": "|x_{t+1} - x_t| of the trainable parameters",
    "mean_update_norm": "mean norm of the clients' released vectors (before clipping under DP)",
    "clip_fraction": "DP: fraction of the replies that were clipped (central placement)",
    "mean_clip_error": "DP: mean |v - clip(v)| (central placement)",
    "effective_noise_multiplier": "DP: the noise on the round's sum over C, as added",
    "mean_state_rounds": "rounds of per-client state the replying clients carry",
    "population": "N: the clients (and canaries) the round was sampled from",
    "expected_cohort": "the public expected cohort size the sum is divided by",
    "direction_shrinkage": "direction-shrinkage='snr': the factor applied to the direction",
    "epsilon": "client-level epsilon spent after this round at the run's delta (null without "
               "a formal guarantee)",
    "epsilon_against_server": "distributed and local placement: the most-sampled client's "
                              "epsilon against the server",
    "epsilon_void_reason": "why no epsilon is claimed (test seed, no noise)",
    "wall_s": "seconds of the round (training and evaluation; not the flatness probes)",
    "sharpness": "SAM sharpness of the global model, every sharpness-every rounds",
    "hessian_top_eigenvalue": "top Hessian eigenvalue, every sharpness-every rounds",
    "audit_epsilon_lower_bound": "in-run audit, every audit-every rounds: lower bound on epsilon",
    "audit_epsilon_estimate": "in-run audit, every audit-every rounds: estimate of epsilon",
    "record_budget": "record-dp: each silo's status, 'within budget' or 'out of budget'",
    "record_epsilon": "record-dp: the record-level epsilon of each silo that publishes one",
    "record_epsilon_min": "record-dp: the smallest published silo epsilon",
    "record_epsilon_max": "record-dp: the largest published silo epsilon",
}
SUMMARY_KEYS: dict[str, str] = {
    "run_name": "the run's folder under results-dir",
    "status": "completed, stopped (with stop_reason) or failed (with error)",
    "stop_reason": "why a stopped run stopped (budget, no silo left, a signal or timeout, a "
                   "copied checkpoint running elsewhere)",
    "error": "why a failed run failed",
    "rounds_completed": "rounds in rounds.jsonl",
    "final_accuracy": "test_accuracy of the last round",
    "best_accuracy": "the highest test_accuracy",
    "best_round": "the round it was reached in",
    "round_loop_s": "seconds of the round loop (every round with its evaluation)",
    "setup_s": "seconds of the ServerApp's set-up before round 1 (config, data, the partition "
               "query, calibration)",
    "epsilon": "client-level epsilon spent at the end (null without a formal guarantee)",
    "delta": "the run's delta",
    "epsilon_void_reason": "why no epsilon is claimed",
    "privacy": "the claim: placement, clip, noise, sampling, accountant, N, q, the budget, "
               "adjacency, units protected, what epsilon covers and what it does not "
               "(outside_epsilon), the noise source",
    "record_privacy": "record-dp: the unit, adjacency, each silo's budget status and the "
                      "numbers the silos published",
    "audit": "audit-canaries: the in-run audit's bound, estimate, confidence and flags",
    "evaluation": "where the model is evaluated: 'central', 'federated' or 'both' "
                  "(test_accuracy is the central one where there is one)",
    "model": "the exported model (<run>/model): its folder, round, how the round was chosen "
             "(keep-best, the metric and its value), whether a formal guarantee covers it, "
             "and that round's central and federated accuracy",
    "federated": "dataset='local': the last federated evaluation (round, accuracy, loss, "
                 "examples, per silo, declines, refusals)",
    "silo_schemas": "dataset='local': each silo's schema fingerprint as it sent it",
    "config": "the resolved run config (with the calibrated noise multiplier)",
}


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
        self.started = time.monotonic()  # the round loop starts next (set-up is done)
        self.setup_s: float | None = None  # the ServerApp's set-up before it, when known

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
            # the round loop (every round, with evaluation); the ServerApp's set-up before it
            # (config, data, the partition query, calibration) is setup_s
            "round_loop_s": round(time.monotonic() - self.started, 3),
            "setup_s": None if self.setup_s is None else round(self.setup_s, 3),
            **{k: _clean(v) for k, v in extra.items()},
            "config": self.config.to_dict(),
        }
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.summary_path)
        return summary
