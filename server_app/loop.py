"""The round loop: sample, train, privatise, account, then the round's callbacks.

Per round, in this order: the budget check (stop before overspending); the strategy's round
(sample, broadcast, screen, aggregate, server rule); the accountant's event, written to the
ledger before anything of the round is released; then the callbacks of ``server_app.callbacks``
in order (failure policy, central evaluation, flatness probes, privacy keys, round record,
Prometheus, console line, checkpoint), each owning its record keys and its saved state.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from logging import ERROR, INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord
from flwr.common import log
from flwr.serverapp import Grid

from plateau.config import LOCAL_DATASET, ConfigError, ConfigValue, RunConfig
from plateau.data import DataError
from plateau.flower_compat import pace_serverapp_pulls
from plateau.messages import exchange, tensors_record
from plateau.privacy.accounting import PrivacyAccountant
from plateau.privacy.canaries import audit_flags
from plateau.privacy.mechanism import mechanism_from_config
from plateau.privacy.noise import TEST_SEED_ENV, test_seed
from plateau.silo_data import Schema
from strategies import LOCAL_RULES, PlateauStrategy
from strategies.base import WITHIN_BUDGET
from strategies.population import ClientPopulation

from .build import build_strategy, load_config, prepare_partitions
from .callbacks import (
    Checkpoint,
    Console,
    Evaluation,
    FailurePolicy,
    FlatnessProbes,
    ModelChoice,
    PrivacyRecord,
    Prometheus,
    Recorder,
    RoundCallback,
    RoundOutcome,
    fmt,
)
from .checkpoint import Checkpointer, checkpoint_folder, privacy_settings
from .evaluation import CentralEvaluator
from .flatness import FlatnessProbe
from .lineage import CopiedRun, RunLineage, run_ledger_folder
from .metrics import RunMetrics
from .privacy_plan import PrivacyLedger, plan_privacy
from .release import export_model
from .results import RunRecorder, default_run_name
from .silos import (
    FEDERATED_OUTSIDE_EPSILON,
    LOCAL_OUTSIDE_EPSILON,
    FederatedEvaluator,
    agree_on_schema,
)
from .stop_request import stop_requested

ADJACENCY = ("zero-out: one client's data replaced by a null client that releases a zero "
             "update; its node still takes part, so every count is the same in both worlds")
EPSILON_COVERS = ("the sequence of global models, and what is computed from them and public "
                  "data alone (broadcast server state, central test accuracy and loss, "
                  "global_update_norm, flatness probes)")
# operator telemetry: computed from what clients reported or from who was sampled; it stays
# inside the trust boundary (the server's operator) and no epsilon covers sharing it
OUTSIDE_EPSILON = {
    "rounds.jsonl": ["train_loss", "mean_update_norm", "clip_fraction", "mean_clip_error",
                     "num_sampled", "num_clients", "num_failed", "num_rejected", "rejected",
                     "num_declined", "declined",
                     "mean_state_rounds", "epsilon_against_server", "wall_s"],
    "prometheus": ["plateau_train_loss", "plateau_clip_fraction", "plateau_update_norm",
                   "plateau_clients_sampled_total", "plateau_clients_replied_total",
                   "plateau_clients_failed_total", "plateau_clients_rejected_total",
                   "plateau_clients_declined_total",
                   "plateau_bytes_sent_total", "plateau_bytes_received_total",
                   "plateau_round_duration_seconds", "plateau_epsilon_against_server"],
}
# record-level DP: what the silos' own epsilon means, and what the server shows of it
RECORD_ADJACENCY = {
    "add/remove": "one record added or removed; for a silo that declared record-public-size: "
                  "its q and delta, and every figure it reports, come from that public number",
    "substitution": "one record replaced by another; for a silo without record-public-size: "
                    "its q and delta come from its own record count, which this epsilon does "
                    "not hide (under client-level DP the count stays on the silo; a run without "
                    "client-level DP publishes it as num-examples)",
}
# per-silo numbers a silo chose (or a record-only run had) to publish, and each silo's budget
# status: functions of its record count (without a public size) and of its participation
RECORD_OUTSIDE_EPSILON = {
    "rounds.jsonl": ["record_epsilon", "record_epsilon_min", "record_epsilon_max",
                     "record_budget"],
    "prometheus": ["plateau_record_epsilon", "plateau_record_budget_within"],
    "summary.json": ["record_privacy.silo_status", "record_privacy.epsilon_per_silo",
                     "record_privacy.silos"],
}
NOISE_SOURCE = ("ChaCha20 keystream (OpenSSL) under a fresh 256-bit OS key per release; "
                "float64 Box-Muller Gaussians from 53-bit uniforms with an untruncated tail, "
                "added in float64 and rounded once; no generator state is stored")


def round_record(server_round: int, metrics: Mapping[str, Any], lr: float, dp: bool,
                 rejected: Mapping[str, int],
                 declined: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The strategy's part of a rounds.jsonl line (callbacks add theirs)."""
    record: dict[str, Any] = {
        "round": server_round,
        "train_loss": metrics.get("train-loss"),
        "num_clients": metrics.get("num-clients", 0),
        "num_sampled": metrics.get("num-sampled"),
        "num_failed": metrics.get("num-failed"),
        "num_rejected": metrics.get("num-rejected"),
        "rejected": dict(rejected),
        "num_declined": metrics.get("num-declined", 0),
        "declined": dict(declined or {}),
        "lr": lr,
        "global_update_norm": metrics.get("global-update-norm"),
        "mean_update_norm": metrics.get("mean-update-norm"),
    }
    if dp:
        record["clip_fraction"] = metrics.get("clip-fraction")
        record["mean_clip_error"] = metrics.get("mean-clip-error")
        record["effective_noise_multiplier"] = metrics.get("effective-noise-multiplier")
    record["mean_state_rounds"] = metrics.get("mean-state-rounds")
    record["population"] = metrics.get("population")
    record["expected_cohort"] = metrics.get("expected-cohort")
    if "direction-shrinkage" in metrics:
        record["direction_shrinkage"] = metrics["direction-shrinkage"]
    return record


def outside_epsilon(config: RunConfig) -> dict[str, list[str]]:
    """What the run publishes that no client-level epsilon covers (operator telemetry)."""
    parts = [OUTSIDE_EPSILON]
    if config.record_dp == "on":
        parts.append(RECORD_OUTSIDE_EPSILON)
    if config.dataset == LOCAL_DATASET:
        parts.append(LOCAL_OUTSIDE_EPSILON)
    if config.federated_evaluation:
        parts.append(FEDERATED_OUTSIDE_EPSILON)
    places = dict.fromkeys(place for part in parts for place in part)
    return {place: [item for part in parts for item in part.get(place, [])]
            for place in places}


def record_privacy_summary(config: RunConfig, strategy: PlateauStrategy,
                           void_reason: str | None) -> dict[str, Any]:
    """summary.json's ``record_privacy``: the unit, the adjacency each silo's epsilon holds
    under, each silo's budget status and the published numbers (none when void)."""
    from plateau.privacy.record_dp import SUBSTITUTION_ACCOUNTANT

    silos = strategy.silos
    published = {} if void_reason else silos.epsilon
    return {
        "unit": "one record of a silo",
        "adjacency": RECORD_ADJACENCY,
        "accountant": {"add/remove": f"{config.record_accountant} (Opacus)",
                       "substitution": SUBSTITUTION_ACCOUNTANT},
        "delta": ("each silo's own (node config max-record-delta, default min(1e-5, 0.01/n))"
                  + (f", at most record-delta={config.record_delta:g}"
                     if config.record_delta > 0 else "")),
        "record_count": ("stays on each silo (replies carry num-examples 1)" if config.dp_enabled
                         else "published as num-examples: a silo's record-public-size where "
                         "declared, else its record count"),
        "silo_status": {str(p): status for p, status in sorted(silos.status.items())},
        "silos_out_of_budget": sorted(silos.exhausted),
        "epsilon_per_silo": None if void_reason else {str(p): e for p, e in
                                                      sorted(published.items())},
        "epsilon_min": None if void_reason else min(published.values(), default=None),
        "epsilon_max": None if void_reason else max(published.values(), default=None),
        # enough to recompute a publishing silo's epsilon: q = batch-size / (public size or
        # records), the step's noise multiplier = noise_multiplier / sqrt(queries per step)
        "silos": None if void_reason else {
            str(p): report for p, report in sorted(silos.reports.items())},
        "queries_per_step": LOCAL_RULES[strategy.local_rule].backprops_per_step,
        "outside_epsilon": RECORD_OUTSIDE_EPSILON,
        "void": void_reason,
    }


def privacy_statement(config: RunConfig, ledger: PrivacyLedger | None,
                      void_reason: str | None = None,
                      epsilon_against_server: float | None = None) -> dict[str, Any]:
    """What the run's privacy claim is, and what it does not cover, in summary.json."""
    mechanism = mechanism_from_config(config)
    record_level = {} if config.record_dp != "on" else {"record_level": {
        "formally_dp": void_reason is None,
        "unit": "one record of a silo",
        "adjacency": RECORD_ADJACENCY,
        "where": "each silo's own accountant and budget; summary.json record_privacy"}}
    if mechanism is None:
        # formally_dp: whether any guarantee holds; units: what it protects
        statement: dict[str, Any] = {"dp": "off", "formally_dp": False, "units": []}
        if record_level:
            statement |= record_level | {"outside_epsilon": outside_epsilon(config),
                                         "formally_dp": void_reason is None,
                                         "units": ["one record of a silo"]}
        return statement
    client_level = ledger is not None and void_reason is None
    statement = {
        "dp": config.dp,
        "clip_mode": config.dp_clip_mode,
        "formally_dp": client_level,
        "units": ((["one client's data"] if client_level else [])
                  + (["one record of a silo"] if record_level and void_reason is None else [])),
        "clip_norm": config.clip_norm,
        "noise_multiplier": config.noise_multiplier,
        "sampling": config.sampling_method,
        "noise_source": NOISE_SOURCE,
        **record_level,
    }
    if void_reason is not None:
        statement["epsilon_void_reason"] = void_reason
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
        "accounted_noise_multiplier": ledger.event.noise_multiplier,
        "delta": ledger.delta,
        "epsilon": None if void_reason else ledger.epsilon,
        "epsilon_budget": ledger.budget[0] if ledger.budget else None,
        "adjacency": ADJACENCY,
        "epsilon_covers": EPSILON_COVERS,
        "outside_epsilon": outside_epsilon(config),
        "epsilon_against_server": None if void_reason else epsilon_against_server,
    }


class RunLoop:
    """One run of the ServerApp, from the validated config to summary.json."""

    def __init__(self, grid: Grid, raw_config: Mapping[str, ConfigValue]) -> None:
        set_up = time.monotonic()
        try:
            config = load_config(raw_config)
            clients = ClientPopulation(config, secret=mechanism_from_config(config) is not None)
            self.schemas: dict[int, Schema] = {}
            if config.dataset == LOCAL_DATASET:
                # the silos' schemas decide the model: ask the nodes before building it
                clients.determine(grid)
                clients.identified_partition_counts(grid)
                config, self.schemas = agree_on_schema(config, clients.schemas)
            self.strategy: PlateauStrategy = build_strategy(config, clients=clients)
            self.evaluator = (CentralEvaluator(
                config, self.strategy.device, agreed=next(iter(self.schemas.values()), None))
                if config.central_evaluation else None)
            self.federated = (FederatedEvaluator(config, clients, grid, self.schemas)
                              if config.federated_evaluation else None)
            self.probe = (FlatnessProbe(config, self.strategy.device)
                          if config.sharpness_every else None)
        except (ConfigError, DataError, RuntimeError) as err:
            log(ERROR, "cannot start the run: %s", err)
            raise
        self.grid = grid
        self.settings = privacy_settings(config)  # before calibration: what resume compares
        run_name = config.run_name or default_run_name(config)
        folder = checkpoint_folder(config, run_name)
        self.checkpointer = Checkpointer(folder) if config.checkpoint or config.resume else None
        self.void_reason: str | None = None
        if test_seed() is not None:
            self.void_reason = (f"{TEST_SEED_ENV} is set on the server: its noise and sampling "
                                "are reproducible, hence not private")
            log(WARNING, "%s; no epsilon is reported (testing only)", self.void_reason)
        elif (config.dp_enabled and config.noise_multiplier == 0
              and config.target_epsilon == 0):
            self.void_reason = ("noise-multiplier=0: updates are clipped but not noised, so no "
                                "finite epsilon holds")
        population = self.strategy.clients.determine(grid)
        try:
            for num_partitions in self.strategy.clients.identified_partition_counts(grid):
                if config.dataset != LOCAL_DATASET:
                    prepare_partitions(config, num_partitions)
        except (ConfigError, RuntimeError) as err:
            log(ERROR, "cannot start the run: %s", err)
            raise
        self.start_round, records, ledger, saved_callbacks = 1, [], None, None
        if config.resume:
            assert self.checkpointer is not None
            saved, ledger = self.checkpointer.load(config)
            config = dataclasses.replace(config, noise_multiplier=float(
                saved["config"]["noise-multiplier"]))
            self.strategy.current = {k: v.to(self.strategy.device)
                                     for k, v in saved["model"].items()}
            self.strategy.restore_state(saved["strategy"])
            population = self.strategy.clients.population
            self.start_round, records = int(saved["round"]) + 1, saved["records"]
            saved_callbacks = saved.get("callbacks")
            log(INFO, "resuming %s after round %d", run_name, saved["round"])
            if self.strategy.client_state:
                log(WARNING, "%s keeps per-client state (%s) on the SuperNodes: nodes with a "
                    "state-dir (node config) or PLATEAU_NODE_STATE_DIR continue it, others "
                    "start it afresh", config.algorithm, self.strategy.client_state)
        if self.void_reason is None and (earlier := next(
                (r["epsilon_void_reason"] for r in records if r.get("epsilon_void_reason")),
                None)) is not None:
            self.void_reason = f"the run this one resumes claims none: {earlier}"
        config, self.ledger = plan_privacy(config, population, calibrate=not config.resume,
                                           void_reason=self.void_reason)
        if self.ledger is not None and ledger is not None:
            self.ledger.accountant = PrivacyAccountant.from_state(
                config.accountant, config.sampling_method, ledger["events"])
            self.strategy.earlier_participations = int(ledger.get("max_participations", max(
                (int(v) for v in ledger.get("participations", {}).values()), default=0)))
            log(INFO, "epsilon already spent: %.4f", self.ledger.epsilon)
        self.lineage = self.run_lineage(config, ledger)
        # clients see the resolved run name: nodes keep their algorithm state under it
        self.config = dataclasses.replace(config, run_name=run_name)
        self.strategy.reconfigure(self.config, mechanism_from_config(config))
        self.recorder = RunRecorder(self.config, records=records)
        self.set_up_at = set_up
        self.metrics = RunMetrics(self.config, run_name)
        has_ledger = self.ledger is not None
        self.callbacks: dict[str, RoundCallback] = {
            "failure-policy": FailurePolicy(self.config),
            "evaluation": Evaluation(self.evaluator, self.federated, self.strategy),
            "model-choice": ModelChoice(self.config, self.strategy),
            "flatness": FlatnessProbes(self.probe, self.strategy),
            "privacy-record": PrivacyRecord(
                self.config, self.strategy, void_reason=lambda: self.void_reason,
                has_ledger=has_ledger, audit=self.audit,
                epsilon_against_server=self.epsilon_against_server),
            "recorder": Recorder(self.recorder),
            "prometheus": Prometheus(self.metrics),
            "console": Console(self.config, has_ledger),
            "checkpoint": Checkpoint(self.save_checkpoint),
        }
        for name, state in (saved_callbacks or {}).items():
            if name not in self.callbacks:
                raise ConfigError(f"resume refused: the checkpoint holds state of a round-loop "
                                  f"feature this version does not have ({name!r})")
            self.callbacks[name].load_state_dict(state)
        choice = self.callbacks["model-choice"]
        assert isinstance(choice, ModelChoice)
        if self.start_round > 1 and choice.round is None and config.keep_best == "last":
            # until a resumed round completes, the model to export is the checkpoint's
            choice.round, choice.state = self.start_round - 1, self.strategy.current

    def run_lineage(self, config: RunConfig, saved: Mapping[str, Any] | None
                    ) -> RunLineage | None:
        """This run's entry in the server's run ledger (a DP run with a checkpoint): a resumed
        copy of a checkpoint that another copy has continued is refused here."""
        if self.ledger is None or self.checkpointer is None:
            return None
        folder = run_ledger_folder(config)
        if saved is not None and saved.get("lineage"):
            lineage = RunLineage(folder, str(saved["lineage"]))
            lineage.check_resume(len(self.ledger.accountant.events))
            return lineage
        if saved is not None:
            log(WARNING, "the checkpoint predates the run ledger: this run is counted there "
                "from now on")
        return RunLineage.start(folder)

    def run(self) -> dict[str, Any]:
        """All remaining rounds; returns the summary written to summary.json."""
        config, strategy = self.config, self.strategy
        self.recorder.setup_s = time.monotonic() - self.set_up_at
        strategy.summary()
        log(INFO, "results: %s", self.recorder.directory.resolve())
        self.metrics.serve()
        if self.start_round == 1 and self.evaluator is not None:
            initial = self.evaluator(strategy.current)
            log(INFO, "[round 0/%d] test accuracy %.4f, loss %.4f", config.num_server_rounds,
                initial.accuracy, initial.loss)
        status, outcome = "failed", {}
        try:
            status = "completed"
            for server_round in range(self.start_round, config.num_server_rounds + 1):
                if (reason := self.over_budget(server_round) or self.no_silo_left()
                        or stop_requested()) is not None:
                    status, outcome["stop_reason"] = "stopped", reason
                    log(WARNING, "stopping: %s", reason)
                    break
                self.one_round(server_round)
        except CopiedRun as stopped:
            status, outcome["stop_reason"] = "stopped", str(stopped)
            log(WARNING, "stopping: %s", stopped)
        except Exception as err:
            status, outcome["error"] = "failed", f"{type(err).__name__}: {err}"
            raise
        except BaseException as stop:  # a stop signal or Ctrl-C: not a completed run
            status, outcome["stop_reason"] = "stopped", f"{type(stop).__name__}: {stop}"
            raise
        finally:
            if self.ledger is not None:
                outcome |= {"epsilon": None if self.void_reason else self.ledger.epsilon,
                            "delta": self.ledger.delta}
                if self.void_reason:
                    outcome["epsilon_void_reason"] = self.void_reason
            if config.record_dp == "on":
                outcome["record_privacy"] = self.record_privacy()
            outcome["evaluation"] = ("both" if config.central_evaluation
                                     and config.federated_evaluation else "federated"
                                     if config.federated_evaluation else "central")
            last = next((r for r in reversed(self.recorder.records)
                         if r.get("federated_silos") is not None), None)
            if last is not None:  # the last federated evaluation, per silo
                outcome["federated"] = {k: last[k] for k in (
                    "round", "federated_accuracy", "federated_loss", "federated_examples",
                    "federated_silos", "federated_declined", "federated_rejected")}
            if self.schemas:
                outcome["silo_schemas"] = {
                    str(p): schema.to_record(with_counts=not config.dp_enabled)
                    for p, schema in self.schemas.items()}
            if (audit := self.audit()) is not None:
                outcome["audit"] = audit
                self.metrics.observe_audit(audit)
            privacy = privacy_statement(config, self.ledger, self.void_reason,
                                        self.epsilon_against_server())
            if (model := self.export(privacy, outcome.get("record_privacy"))) is not None:
                outcome["model"] = model
            summary = self.recorder.write_summary(status, privacy=privacy, **outcome)
            self.metrics.close()
        log(INFO, "finished (%s): final accuracy %s, best %s (round %s)%s%s, rounds %.1f s "
            "(set-up %.1f s)", status, fmt(summary["final_accuracy"]),
            fmt(summary["best_accuracy"]), summary["best_round"], self.epsilon_phrase(),
            self.record_phrase(), summary["round_loop_s"], summary["setup_s"] or 0.0)
        return summary

    def export(self, privacy: Mapping[str, Any],
               record_privacy: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Write <run>/model (the round keep-best chose) once the run ends; summary.json's
        "model", or None when no round completed."""
        choice = self.callbacks["model-choice"]
        assert isinstance(choice, ModelChoice)
        server_round, state = choice.round, choice.state
        records = self.recorder.records
        if state is None or server_round is None:
            return None
        agreed = next(iter(self.schemas.values()), None)
        columns = (tuple(c for c, _ in agreed.columns[:-1])
                   if agreed is not None and agreed.kind == "tabular" else ())
        model = export_model(self.recorder.directory, self.config, state, server_round,
                             choice.value, privacy, record_privacy, columns)
        record = next((r for r in records if r.get("round") == server_round), {})
        if model is not None:
            model["central_accuracy"] = (record.get("test_accuracy")
                                         if self.config.central_evaluation else None)
            model["federated_accuracy"] = record.get("federated_accuracy")
        return model

    def record_phrase(self) -> str:
        """'; record-level: ...' for the console: each silo's budget status, and the largest
        epsilon a silo published."""
        if self.config.record_dp != "on":
            return ""
        silos = self.strategy.silos
        within = sum(status == WITHIN_BUDGET for status in silos.status.values())
        published = ("" if self.void_reason or not silos.epsilon else
                     f", largest published epsilon {max(silos.epsilon.values()):.4f}")
        return (f"; record-level: {within} of {len(silos.status)} silos within their budget"
                f"{published}")

    def epsilon_phrase(self) -> str:
        """', epsilon E at delta D' for the console, or why there is none."""
        if self.ledger is None:
            return ""
        if self.void_reason is not None:
            return f", no epsilon ({self.void_reason})"
        return f", epsilon {self.ledger.epsilon:.4f} at delta {self.ledger.delta:g}"

    def audit(self) -> dict[str, Any] | None:
        """The in-run audit now (audit-canaries): its lower bound and estimate beside the
        accountant's epsilon, with a warning when either exceeds it (a lower bound above
        epsilon is a bug or an attack; an estimate above it deserves a look)."""
        canaries = self.strategy.canaries
        if canaries is None or self.ledger is None:
            return None
        report = canaries.report(self.ledger.delta)  # the run's next look
        result: dict[str, Any] = report.as_dict()
        epsilon = None if self.void_reason else self.ledger.epsilon
        flags = audit_flags(report, epsilon)
        if "lower-bound-above-epsilon" in flags:
            log(WARNING, "AUDIT: the empirical lower bound %.4f exceeds the accountant's epsilon "
                "%.4f: the mechanism leaks more than accounted (a bug or an attack)",
                report.epsilon_lower_bound, epsilon)
        if "estimate-above-epsilon" in flags:
            log(WARNING, "AUDIT: the one-shot estimate %.4f (%.4f at the low end of its range) "
                "exceeds the accountant's epsilon %.4f: check the mechanism",
                report.epsilon_estimate, report.epsilon_estimate_low, epsilon)
        log(INFO, "audit (%d canaries, %d inserted): epsilon lower bound %.4f (%.4g%% "
            "confidence), one-shot estimate %s, accountant's epsilon %s", report.canaries,
            report.inserted, report.epsilon_lower_bound, 100 * report.confidence,
            fmt(report.epsilon_estimate), fmt(epsilon))
        return result | {"flags": flags, "accountant_epsilon": epsilon}

    def epsilon_against_server(self) -> float | None:
        """The most-sampled client's epsilon against the server (local, distributed)."""
        if self.ledger is None or self.void_reason is not None:
            return None
        return self.ledger.epsilon_against_server(self.strategy.max_participations())

    def void_epsilon(self, reason: str) -> None:
        """From now on, and for every round already recorded, the run claims no epsilon."""
        if self.void_reason is None:
            self.void_reason = reason
            log(WARNING, "no epsilon is reported: %s", reason)
            self.recorder.void_epsilon(reason)

    def over_budget(self, server_round: int) -> str | None:
        """Why the run must stop before this round, if it must."""
        if self.ledger is None:
            return None
        # the event the wired mechanism performs: a weaker one than planned stops the run
        # before it overspends, not one round after
        fits, after = self.ledger.next_round_fits(self.strategy.next_event() or self.ledger.event)
        if fits or self.ledger.budget is None:
            return None
        budget, key = self.ledger.budget
        return (f"privacy budget: round {server_round} would take epsilon from "
                f"{self.ledger.epsilon:.4f} to {after:.4f} > {key}={budget:g}")

    def no_silo_left(self) -> str | None:
        """Under record-level DP, why no round can run: every silo has declined for lack of
        its own budget (a silo's budget only shrinks)."""
        exhausted = self.strategy.silos.exhausted
        if self.config.record_dp != "on" or len(exhausted) < self.strategy.clients.real_population:
            return None
        return (f"no silo can train: all {len(exhausted)} declined, their record-level "
                "epsilon budget spent")

    def record_privacy(self) -> dict[str, Any]:
        """Record-level DP as the silos reported it: each silo's budget status, and the numbers
        of the silos that publish them (telemetry: see ``RECORD_OUTSIDE_EPSILON``)."""
        return record_privacy_summary(self.config, self.strategy, self.void_reason)

    def one_round(self, server_round: int) -> None:
        """The strategy's round, then the ledger (before anything of the round is released),
        then every callback in order."""
        config, strategy = self.config, self.strategy
        started = time.monotonic()
        arrays = tensors_record(strategy.current)
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid)
        # a stop ends the wait; the round still goes through with the replies it has (they
        # were handed to the server: counted against it, and their round is accounted)
        replies = exchange(self.grid, messages, config.round_timeout, config.reply_poll_interval,
                           should_stop=lambda: stop_requested() is not None)
        result = strategy.train_round(server_round, replies)
        epsilon = None
        if self.ledger is not None:
            epsilon = self.ledger.commit_round(result.event)
            if self.checkpointer is not None:
                self.checkpointer.save_ledger(
                    server_round, self.settings, self.ledger.accountant.state(),
                    strategy.max_participations(),
                    self.ledger.budget[0] if self.ledger.budget else 0.0,
                    self.lineage.lineage if self.lineage is not None else None)
            if self.lineage is not None:  # another copy of the checkpoint may not run on
                events = len(self.ledger.accountant.events)
                self.lineage.commit(events - 1, events)
        stats, metrics = result.stats, result.metrics
        if stats.test_seeded_nodes and (self.ledger is not None or config.record_dp == "on"):
            self.void_epsilon(f"{stats.test_seeded_nodes} SuperNode(s) drew their noise from "
                              f"{TEST_SEED_ENV} in round {server_round}: predictable, hence "
                              "not private")
        record = round_record(server_round, metrics or {}, strategy.learning_rate(server_round),
                              config.dp_enabled, stats.rejected, stats.declined)
        record["epsilon"] = None if self.void_reason is not None else epsilon
        outcome = RoundOutcome(server_round, started, stats, list(replies), record)
        for callback in self.callbacks.values():
            callback.after_round(outcome)

    def save_checkpoint(self, server_round: int) -> None:
        """The whole server state after a completed round, callbacks' state included."""
        if self.checkpointer is None or not self.config.checkpoint:
            return
        strategy = self.strategy
        self.checkpointer.save({
            "round": server_round, "model": {k: v.cpu() for k, v in strategy.current.items()},
            "strategy": strategy.checkpoint_state(), "records": self.recorder.records,
            "config": self.config.to_dict(), "privacy": self.settings,
            "ledger": self.ledger.accountant.state() if self.ledger else None,
            "callbacks": {name: callback.state_dict()
                          for name, callback in self.callbacks.items()},
        })


def run(grid: Grid, raw_config: Mapping[str, ConfigValue]) -> dict[str, Any]:
    """Train for ``num-server-rounds`` rounds; returns the summary written to summary.json."""
    # before the loop's first exchange (the partition query in RunLoop's set-up)
    pace_serverapp_pulls(RunConfig.from_mapping(raw_config).reply_poll_interval)
    return RunLoop(grid, raw_config).run()
