"""The round loop's features as callbacks: each owns its keys of the round record and its state.

After a round's noisy aggregate exists and the privacy ledger has been written (the loop's own
job: nothing of a round may be released before it), the loop hands a ``RoundOutcome`` to each
callback in order. A callback adds the record keys it owns, acts (stops the run, writes files,
exports metrics) and keeps whatever state it needs across rounds in ``state_dict``, which the
checkpoint carries and ``load_state_dict`` restores on resume. A new feature is one class here
and one line in ``RunLoop.callbacks``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, ClassVar

from flwr.app import Message
from flwr.common import log

from plateau.config import RunConfig
from plateau.messages import short_reason
from strategies import PlateauStrategy
from strategies.screening import RoundStats

from .evaluation import CentralEvaluator
from .flatness import FlatnessProbe
from .metrics import RunMetrics
from .results import RunRecorder
from .silos import FederatedEvaluator

UNUSABLE_DATA = "silo-data"  # the decline of a silo whose own files cannot be used


class RunFailed(RuntimeError):
    """A run that cannot go on (too many failed rounds in a row)."""


@dataclass
class RoundOutcome:
    """One finished round as the callbacks see it; ``record`` is its rounds.jsonl line, which
    each callback extends with the keys it owns."""

    server_round: int
    started: float  # time.monotonic() when the round began
    stats: RoundStats
    replies: list[Message]
    record: dict[str, Any] = field(default_factory=dict)


class RoundCallback:
    """A feature of the round loop. Subclasses override what they need."""

    def after_round(self, outcome: RoundOutcome) -> None:
        """Add this feature's record keys and act on the round."""

    def state_dict(self) -> dict[str, Any]:
        """State to carry across a resume (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned; a state that does not fit is refused."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state; got {sorted(state)}")


class FailurePolicy(RoundCallback):
    """A round with fewer than min-replies accepted replies (of the clients willing to train)
    fails; max-failed-rounds of them in a row stop the run. The count survives a resume."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.failed_in_a_row = 0

    def after_round(self, outcome: RoundOutcome) -> None:
        stats, config = outcome.stats, self.config
        # a decline is not a failure, except a silo's unusable data: a run whose silos can no
        # longer read their files must stop, not go on training nothing
        unusable = stats.declined.get(UNUSABLE_DATA, 0)
        willing = stats.sampled - sum(stats.declined.values()) + unusable
        if willing <= 0 or stats.accepted >= min(config.min_replies, willing):
            self.failed_in_a_row = 0
            return
        self.failed_in_a_row += 1
        log(WARNING, "round %d failed: %d of %d sampled clients accepted (min-replies %d); %d "
            "failed round(s) in a row", outcome.server_round, stats.accepted, stats.sampled,
            config.min_replies, self.failed_in_a_row)
        if self.failed_in_a_row >= config.max_failed_rounds:
            reasons = sorted({short_reason(r.error.reason) for r in outcome.replies
                              if r.has_error()})
            raise RunFailed(
                f"{self.failed_in_a_row} rounds in a row with fewer than min-replies="
                f"{config.min_replies} accepted replies (last: {stats.failed} errors, "
                f"{stats.missing} without reply, rejected {dict(stats.rejected)}"
                + (f", {unusable} declined for unusable data" if unusable else "") + ")"
                + (f"; client errors: {'; '.join(reasons)[:400]}" if reasons else ""))

    def state_dict(self) -> dict[str, Any]:
        return {"failed_in_a_row": self.failed_in_a_row}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.failed_in_a_row = int(state.get("failed_in_a_row", 0))


class Evaluation(RoundCallback):
    """Evaluation of the new global model: central, on the server's held-out split, and/or
    federated, by the silos on their own held-out records (every evaluate-every rounds and
    after the last). ``test_accuracy`` is the central one, or the federated one where the
    server holds no data. The round's wall time is taken right after (training plus
    evaluation, as the console reports it)."""

    keys = ("test_accuracy", "test_loss", "federated_accuracy", "federated_loss",
            "federated_examples", "federated_silos", "federated_declined",
            "federated_rejected", "wall_s")

    def __init__(self, central: CentralEvaluator | None, federated: FederatedEvaluator | None,
                 strategy: PlateauStrategy) -> None:
        self.central, self.federated, self.strategy = central, federated, strategy

    def after_round(self, outcome: RoundOutcome) -> None:
        record, current = outcome.record, self.strategy.current
        record |= {"test_accuracy": None, "test_loss": None}
        if self.central is not None:
            result = self.central(current)
            record |= {"test_accuracy": result.accuracy, "test_loss": result.loss}
        if self.federated is not None and self.federated.due(outcome.server_round):
            federated = self.federated(current, outcome.server_round)
            record |= {"federated_accuracy": federated.accuracy,
                       "federated_loss": federated.loss,
                       "federated_examples": federated.examples,
                       "federated_silos": federated.per_silo,
                       "federated_declined": federated.declined,
                       "federated_rejected": federated.rejected}
            if self.central is None:
                record |= {"test_accuracy": federated.accuracy, "test_loss": federated.loss}
        record["wall_s"] = round(time.monotonic() - outcome.started, 4)


class ModelChoice(RoundCallback):
    """Which round's model the run exports (keep-best): the last round's, or the best so far
    by the central or federated accuracy. Holds that round's model (a reference to the
    strategy's state, which every round replaces and never changes in place; a copy for a best
    round, carried across a resume)."""

    METRIC: ClassVar[dict[str, str]] = {"central": "test_accuracy",
                                        "federated": "federated_accuracy"}

    def __init__(self, config: RunConfig, strategy: PlateauStrategy) -> None:
        self.keep, self.strategy = config.keep_best, strategy
        self.round: int | None = None
        self.value: float | None = None
        self.state: dict[str, Any] | None = None

    def after_round(self, outcome: RoundOutcome) -> None:
        if self.keep == "last":
            self.round, self.state = outcome.server_round, self.strategy.current
            return
        value = outcome.record.get(self.METRIC[self.keep])
        if value is not None and (self.value is None or value > self.value):
            self.round, self.value = outcome.server_round, float(value)
            self.state = {k: v.detach().cpu().clone() for k, v in self.strategy.current.items()}

    def state_dict(self) -> dict[str, Any]:
        if self.keep == "last" or self.round is None:
            return {}
        return {"round": self.round, "value": self.value, "model": self.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            self.round, self.value = int(state["round"]), float(state["value"])
            self.state = dict(state["model"])


class FlatnessProbes(RoundCallback):
    """SAM sharpness and the top Hessian eigenvalue every sharpness-every rounds."""

    def __init__(self, probe: FlatnessProbe | None, strategy: PlateauStrategy) -> None:
        self.probe, self.strategy = probe, strategy

    def after_round(self, outcome: RoundOutcome) -> None:
        flatness = (self.probe(self.strategy.current, outcome.server_round)
                    if self.probe is not None and self.probe.due(outcome.server_round) else None)
        outcome.record |= {
            "sharpness": flatness.sharpness if flatness else None,
            "hessian_top_eigenvalue": flatness.hessian_top_eigenvalue if flatness else None}
        if flatness is not None:
            log(INFO, "[round %d] sharpness %.5f, top Hessian eigenvalue %.4f",
                outcome.server_round, flatness.sharpness, flatness.hessian_top_eigenvalue)


class PrivacyRecord(RoundCallback):
    """The round's privacy keys besides the accountant's epsilon: each silo's record-level
    budget status and the epsilon of the silos that publish one, the in-run audit every
    audit-every rounds, the most-sampled client's epsilon against
    the server, and why no epsilon is claimed (read from the loop, which owns the ledger)."""

    def __init__(self, config: RunConfig, strategy: PlateauStrategy, *,
                 void_reason: Callable[[], str | None], has_ledger: bool,
                 audit: Callable[[], dict[str, Any] | None],
                 epsilon_against_server: Callable[[], float | None]) -> None:
        self.config, self.strategy, self.void_reason = config, strategy, void_reason
        self.has_ledger, self.audit = has_ledger, audit
        self.epsilon_against_server = epsilon_against_server

    def after_round(self, outcome: RoundOutcome) -> None:
        record, config = outcome.record, self.config
        if config.record_dp == "on":
            silos = self.strategy.silos
            record["record_budget"] = {str(p): s for p, s in sorted(silos.status.items())}
            if self.void_reason() is None:  # the numbers the silos chose to publish
                spent = silos.epsilon
                record["record_epsilon"] = {str(p): e for p, e in sorted(spent.items())}
                record["record_epsilon_min"] = min(spent.values(), default=None)
                record["record_epsilon_max"] = max(spent.values(), default=None)
        every = config.audit_every
        if (every and outcome.server_round % every == 0
                and outcome.server_round < config.num_server_rounds
                and (audit := self.audit()) is not None):
            record["audit_epsilon_lower_bound"] = audit["epsilon_lower_bound"]
            record["audit_epsilon_estimate"] = audit["epsilon_estimate"]
        if self.has_ledger:
            record["epsilon_against_server"] = self.epsilon_against_server()
            if (reason := self.void_reason()) is not None:
                record["epsilon_void_reason"] = reason


class Recorder(RoundCallback):
    """Appends the finished record to rounds.jsonl."""

    def __init__(self, recorder: RunRecorder) -> None:
        self.recorder = recorder

    def after_round(self, outcome: RoundOutcome) -> None:
        self.recorder.record_round(outcome.record)


class Prometheus(RoundCallback):
    """Exports the round to the metrics endpoint / Pushgateway."""

    def __init__(self, metrics: RunMetrics) -> None:
        self.metrics = metrics

    def after_round(self, outcome: RoundOutcome) -> None:
        stats = outcome.stats
        failed = {"error": stats.failed, "no-reply": stats.missing}
        self.metrics.observe_round(outcome.record, stats.norms, stats.rejected,
                                   {k: v for k, v in failed.items() if v},
                                   (stats.bytes_sent, stats.bytes_received))


class Console(RoundCallback):
    """The console's one line per round."""

    def __init__(self, config: RunConfig, has_ledger: bool) -> None:
        self.config, self.has_ledger = config, has_ledger

    def after_round(self, outcome: RoundOutcome) -> None:
        record = outcome.record
        clipping = (f" | clipped {fmt(record['clip_fraction'])}, clip error "
                    f"{fmt(record['mean_clip_error'])}" if self.config.dp_enabled else "")
        epsilon = ("" if not self.has_ledger else " | epsilon n/a (not private)"
                   if record["epsilon"] is None else f" | epsilon {record['epsilon']:.4f}")
        where = "test" if self.config.central_evaluation else "federated"
        log(INFO, "[round %d/%d] %s accuracy %s, loss %s | train loss %s | clients %d/%d | "
            "update norm %s, global %s%s%s | %.2f s", record["round"],
            self.config.num_server_rounds, where, fmt(record["test_accuracy"]),
            fmt(record["test_loss"]),
            fmt(record["train_loss"]), record["num_clients"], outcome.stats.sampled,
            fmt(record["mean_update_norm"]), fmt(record["global_update_norm"]), clipping,
            epsilon, record["wall_s"])


class Checkpoint(RoundCallback):
    """Writes the whole server state after the round: model, strategy state, records, config,
    privacy settings, accountant and every callback's state (last in the pipeline)."""

    def __init__(self, save: Callable[[int], None]) -> None:
        self.save = save

    def after_round(self, outcome: RoundOutcome) -> None:
        self.save(outcome.server_round)


def fmt(value: float | None) -> str:
    """A value to 4 decimals, or n/a."""
    return "n/a" if value is None else f"{value:.4f}"
