"""The round loop: sample, train, privatise, account, checkpoint, evaluate, record, export.

Per round, in this order: the budget check (stop before overspending); the strategy's round
(sample, broadcast, screen, aggregate, server rule); the accountant's event, written to the
ledger before anything of the round is released; the failure policy; central evaluation and the
flatness probes; the round record, the metrics and the console line; the checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from plateau.accounting import PrivacyAccountant
from plateau.config import ConfigError, ConfigValue, RunConfig
from plateau.data import DataError
from plateau.privacy import mechanism_from_config, test_seed_override
from strategies import PlateauStrategy
from strategies.base import short_reason

from .build import build_strategy, load_config
from .checkpoint import Checkpointer, privacy_settings
from .evaluation import CentralEvaluator
from .flatness import Flatness, FlatnessProbe
from .metrics import RunMetrics
from .privacy_plan import PrivacyLedger, plan_privacy
from .results import RunRecorder, default_run_name


class RunFailed(RuntimeError):
    """A run that cannot go on (too many failed rounds in a row)."""


def round_record(server_round: int, metrics: Mapping[str, Any], accuracy: float, loss: float,
                 lr: float, wall_s: float, dp: bool, flatness: Flatness | None,
                 rejected: Mapping[str, int]) -> dict[str, Any]:
    """One line of rounds.jsonl."""
    record: dict[str, Any] = {
        "round": server_round,
        "test_accuracy": accuracy,
        "test_loss": loss,
        "train_loss": metrics.get("train-loss"),
        "num_clients": metrics.get("num-clients", 0),
        "num_sampled": metrics.get("num-sampled"),
        "num_failed": metrics.get("num-failed"),
        "num_rejected": metrics.get("num-rejected"),
        "rejected": dict(rejected),
        "lr": lr,
        "global_update_norm": metrics.get("global-update-norm"),
        "mean_update_norm": metrics.get("mean-update-norm"),
    }
    if dp:
        record["clip_fraction"] = metrics.get("clip-fraction")
        record["mean_clip_error"] = metrics.get("mean-clip-error")
        record["effective_noise_multiplier"] = metrics.get("effective-noise-multiplier")
    record["sharpness"] = flatness.sharpness if flatness else None
    record["hessian_top_eigenvalue"] = flatness.hessian_top_eigenvalue if flatness else None
    record["mean_state_rounds"] = metrics.get("mean-state-rounds")
    record["population"] = metrics.get("population")
    record["expected_cohort"] = metrics.get("expected-cohort")
    record["wall_s"] = round(wall_s, 4)
    return record


def privacy_statement(config: RunConfig, ledger: PrivacyLedger | None) -> dict[str, Any]:
    """What the run's privacy claim is, in summary.json."""
    mechanism = mechanism_from_config(config)
    if mechanism is None:
        return {"dp": "off", "formally_dp": False}
    statement: dict[str, Any] = {
        "dp": config.dp,
        "clip_mode": config.dp_clip_mode,
        "formally_dp": ledger is not None,
        "clip_norm": config.clip_norm,
        "noise_multiplier": config.noise_multiplier,
        "sampling": config.sampling_method,
    }
    if test_seed_override() is not None:
        statement["test_seeded"] = True
    if ledger is None:
        statement["note"] = ("the authors' per-tensor median clip is not differentially private"
                             if not mechanism.formally_dp else
                             "BatchNorm statistics were released without protection")
        return statement
    return statement | {
        "accountant": config.accountant,
        "population": ledger.population,
        "sample_rate": config.sample_rate,
        "expected_cohort": ledger.expected_cohort,
        "delta": ledger.delta,
        "epsilon": ledger.epsilon,
        "adjacency": "add/remove one client" if config.sampling_method == "poisson"
        else "replace one client",
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class RunLoop:
    """One run of the ServerApp, from the validated config to summary.json."""

    def __init__(self, grid: Grid, raw_config: Mapping[str, ConfigValue]) -> None:
        try:
            config = load_config(raw_config)
            self.strategy: PlateauStrategy = build_strategy(config)
            self.evaluator = CentralEvaluator(config, self.strategy.device)
            self.probe = (FlatnessProbe(config, self.strategy.device)
                          if config.sharpness_every else None)
        except (ConfigError, DataError, RuntimeError) as err:
            log(ERROR, "cannot start the run: %s", err)
            raise
        self.grid = grid
        self.settings = privacy_settings(config)  # before calibration: what resume compares
        run_name = config.run_name or default_run_name(config)
        folder = Path(config.checkpoint_dir or Path(config.results_dir) / run_name / "checkpoint")
        self.checkpointer = Checkpointer(folder) if config.checkpoint or config.resume else None
        if test_seed_override() is not None:
            log(WARNING, "PLATEAU_TEST_SEED is set: noise and sampling are reproducible and "
                "therefore NOT private against anyone who knows the seed (testing only)")
        population = self.strategy.determine_population(grid)
        self.start_round, records, events = 1, [], None
        if config.resume:
            assert self.checkpointer is not None
            saved, events = self.checkpointer.load(config)
            config = dataclasses.replace(config, noise_multiplier=float(
                saved["config"]["noise-multiplier"]))
            self.strategy.current = {k: v.to(self.strategy.device)
                                     for k, v in saved["model"].items()}
            self.strategy.restore_state(saved["strategy"])
            population = self.strategy.population
            self.start_round, records = int(saved["round"]) + 1, saved["records"]
            log(INFO, "resuming %s after round %d", run_name, saved["round"])
            if self.strategy.client_state:
                log(WARNING, "%s keeps per-client state (%s) on the SuperNodes; a resumed run "
                    "starts it afresh", config.algorithm, self.strategy.client_state)
        config, self.ledger = plan_privacy(config, population, calibrate=not config.resume)
        if self.ledger is not None and events is not None:
            self.ledger.accountant = PrivacyAccountant.from_state(
                config.accountant, config.sampling_method, events)
            log(INFO, "epsilon already spent: %.4f", self.ledger.epsilon)
        self.strategy.config, self.strategy.privacy = config, mechanism_from_config(config)
        self.config = dataclasses.replace(config, run_name=run_name)
        self.recorder = RunRecorder(self.config, records=records)
        self.metrics = RunMetrics(self.config, run_name)
        self.failed_in_a_row = 0

    def run(self) -> dict[str, Any]:
        """All remaining rounds; returns the summary written to summary.json."""
        config, strategy = self.config, self.strategy
        strategy.summary()
        log(INFO, "results: %s", self.recorder.directory.resolve())
        self.metrics.serve()
        if self.start_round == 1:
            initial = self.evaluator(strategy.current)
            log(INFO, "[round 0/%d] test accuracy %.4f, loss %.4f", config.num_server_rounds,
                initial.accuracy, initial.loss)
        status, outcome = "failed", {}
        try:
            status = "completed"
            for server_round in range(self.start_round, config.num_server_rounds + 1):
                if (reason := self.over_budget(server_round)) is not None:
                    status, outcome["stop_reason"] = "stopped", reason
                    log(WARNING, "stopping: %s", reason)
                    break
                self.one_round(server_round)
        except Exception as err:
            status, outcome["error"] = "failed", f"{type(err).__name__}: {err}"
            raise
        finally:
            if self.ledger is not None:
                outcome |= {"epsilon": self.ledger.epsilon, "delta": self.ledger.delta}
            summary = self.recorder.write_summary(
                status, privacy=privacy_statement(config, self.ledger), **outcome)
            self.metrics.close()
        log(INFO, "finished (%s): final accuracy %s, best %s (round %s)%s, %.1f s", status,
            _fmt(summary["final_accuracy"]), _fmt(summary["best_accuracy"]),
            summary["best_round"],
            f", epsilon {self.ledger.epsilon:.4f} at delta {self.ledger.delta:g}"
            if self.ledger else "", summary["total_time_s"])
        return summary

    def over_budget(self, server_round: int) -> str | None:
        """Why the run must stop before this round, if it must."""
        if self.ledger is None:
            return None
        fits, after = self.ledger.next_round_fits()
        if fits:
            return None
        return (f"privacy budget: round {server_round} would take epsilon from "
                f"{self.ledger.epsilon:.4f} to {after:.4f} > max-epsilon="
                f"{self.config.max_epsilon:g}")

    def one_round(self, server_round: int) -> None:
        config, strategy = self.config, self.strategy
        started = time.monotonic()
        arrays = ArrayRecord({k: v.cpu() for k, v in strategy.current.items()})
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid)
        replies = list(self.grid.send_and_receive(messages, timeout=config.round_timeout))
        _, metrics = strategy.aggregate_train(server_round, replies)
        epsilon = None
        if self.ledger is not None:
            epsilon = self.ledger.commit_round()
            if self.checkpointer is not None:
                self.checkpointer.save_ledger(server_round, self.settings,
                                              self.ledger.accountant.state())
        stats = strategy.last_stats
        self.check_failures(server_round, replies)
        result = self.evaluator(strategy.current)
        wall_s = time.monotonic() - started
        flatness = (self.probe(strategy.current, server_round)
                    if self.probe is not None and self.probe.due(server_round) else None)
        record = round_record(server_round, metrics or {}, result.accuracy, result.loss,
                              strategy.learning_rate(server_round), wall_s, config.dp_enabled,
                              flatness, stats.rejected)
        record["epsilon"] = epsilon
        self.recorder.record_round(record)
        failed = {"error": stats.failed, "no-reply": stats.missing}
        self.metrics.observe_round(record, stats.norms, stats.rejected,
                                   {k: v for k, v in failed.items() if v},
                                   (stats.bytes_sent, stats.bytes_received))
        self.log_round(record, stats.sampled, flatness)
        if self.checkpointer is not None and config.checkpoint:
            self.checkpointer.save({
                "round": server_round, "model": {k: v.cpu() for k, v in strategy.current.items()},
                "strategy": strategy.checkpoint_state(), "records": self.recorder.records,
                "config": config.to_dict(), "privacy": self.settings,
                "ledger": self.ledger.accountant.state() if self.ledger else None,
            })

    def check_failures(self, server_round: int, replies: list[Any]) -> None:
        """Count a round with fewer than min-replies accepted replies as failed; stop after
        max-failed-rounds of them in a row."""
        stats, config = self.strategy.last_stats, self.config
        required = min(config.min_replies, stats.sampled)
        if stats.sampled == 0 or stats.accepted >= required:
            self.failed_in_a_row = 0
            return
        self.failed_in_a_row += 1
        log(WARNING, "round %d failed: %d of %d sampled clients accepted (min-replies %d); %d "
            "failed round(s) in a row", server_round, stats.accepted, stats.sampled,
            config.min_replies, self.failed_in_a_row)
        if self.failed_in_a_row >= config.max_failed_rounds:
            reasons = sorted({short_reason(r.error.reason) for r in replies if r.has_error()})
            raise RunFailed(
                f"{self.failed_in_a_row} rounds in a row with fewer than min-replies="
                f"{config.min_replies} accepted replies (last: {stats.failed} errors, "
                f"{stats.missing} without reply, rejected {dict(stats.rejected)})"
                + (f"; client errors: {'; '.join(reasons)[:400]}" if reasons else ""))

    def log_round(self, record: dict[str, Any], sampled: int, flatness: Flatness | None) -> None:
        """The console's one line per round (plus the flatness line when measured)."""
        clipping = (f" | clipped {_fmt(record['clip_fraction'])}, clip error "
                    f"{_fmt(record['mean_clip_error'])}" if self.config.dp_enabled else "")
        epsilon = "" if record["epsilon"] is None else f" | epsilon {record['epsilon']:.4f}"
        log(INFO, "[round %d/%d] test accuracy %.4f, loss %.4f | train loss %s | clients %d/%d | "
            "update norm %s, global %s%s%s | %.2f s", record["round"],
            self.config.num_server_rounds, record["test_accuracy"], record["test_loss"],
            _fmt(record["train_loss"]), record["num_clients"], sampled,
            _fmt(record["mean_update_norm"]), _fmt(record["global_update_norm"]), clipping,
            epsilon, record["wall_s"])
        if flatness is not None:
            log(INFO, "[round %d] sharpness %.5f, top Hessian eigenvalue %.4f", record["round"],
                flatness.sharpness, flatness.hessian_top_eigenvalue)


def run(grid: Grid, raw_config: Mapping[str, ConfigValue]) -> dict[str, Any]:
    """Train for ``num-server-rounds`` rounds; returns the summary written to summary.json."""
    return RunLoop(grid, raw_config).run()
