"""Prometheus metrics of a run, served by the ServerApp and optionally pushed to a Pushgateway.

Every metric is prefixed ``plateau_`` and labelled with ``run`` and ``algorithm``. The registry is
the run's own (not the process-global one), so several runs in one process never collide. A
ServerApp lives for one run, so the endpoint disappears with it: ``metrics-linger`` keeps it up
for a last scrape, and ``metrics-pushgateway`` pushes after every round for dashboards that span
runs. Clients run no HTTP servers; what they report comes back through the strategy.

Under DP, epsilon covers the sequence of models and what is computed from them (accuracy, loss,
global update norm, flatness); the metrics whose help text says "operator telemetry" come from
what clients reported or from who was sampled and are not covered by it: they stay with the
operator.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.common import log
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway
from prometheus_client.exposition import start_http_server

from plateau.config import RunConfig
from strategies.base import WITHIN_BUDGET

NORM_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
DURATION_BUCKETS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
LABELS = ("run", "algorithm")
TELEMETRY = " (operator telemetry: not covered by epsilon)"


class RunMetrics:
    """The run's metrics; ``observe_round`` updates them from a round's record."""

    def __init__(self, config: RunConfig, run_name: str) -> None:
        self.config = config
        self.labels = {"run": run_name, "algorithm": config.algorithm}
        self.registry = CollectorRegistry()
        self._server: Any = None

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"plateau_{name}", doc, LABELS, registry=self.registry)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"plateau_{name}", doc, (*LABELS, *extra), registry=self.registry)

        self.round = gauge("round", "Last completed server round")
        self.rounds_planned = gauge("rounds_planned", "num-server-rounds of the run")
        self.round_completed_time = gauge("round_completed_timestamp_seconds",
                                          "Unix time the last round completed")
        self.accuracy = gauge("test_accuracy", "Central test accuracy of the global model")
        self.test_loss = gauge("test_loss", "Central test loss of the global model")
        self.train_loss = gauge("train_loss", "Mean training loss the clients reported" + TELEMETRY)
        self.epsilon = gauge("epsilon_spent", "Epsilon spent so far at the run's delta (NaN when "
                             "the run claims none, e.g. test-seeded noise)")
        self.epsilon_budget = gauge("epsilon_budget", "The smaller of target-epsilon and "
                                    "max-epsilon among those set; 0 = none")
        self.epsilon_server = gauge("epsilon_against_server", "Epsilon of the most-sampled "
                                    "client against the server (local, distributed)" + TELEMETRY)
        self.audit_lower_bound = gauge("audit_epsilon_lower_bound", "In-run audit: empirical "
                                       "lower bound on epsilon from the canaries (95% over "
                                       "the run's audits)")
        self.audit_estimate = gauge("audit_epsilon_estimate", "In-run audit: one-shot estimate "
                                    "of epsilon from the canaries")
        self.record_epsilon = Gauge(
            "plateau_record_epsilon", "Record-level epsilon a silo chose to publish (its own "
            "accountant and delta; a function of its record count unless it declared "
            "record-public-size)" + TELEMETRY, (*LABELS, "partition"), registry=self.registry)
        self.record_budget = Gauge(
            "plateau_record_budget_within", "1 while a silo's replies say it is within its "
            "record-level budget, 0 once it declined for lack of it" + TELEMETRY,
            (*LABELS, "partition"), registry=self.registry)
        self.federated_accuracy = gauge(
            "federated_accuracy", "Accuracy of the global model on the silos' own held-out "
            "records, weighted by their examples" + TELEMETRY)
        self.silo_accuracy = Gauge(
            "plateau_silo_accuracy", "Accuracy of the global model on one silo's held-out "
            "records" + TELEMETRY, (*LABELS, "partition"), registry=self.registry)
        self.clip_fraction = gauge("clip_fraction", "Fraction of client updates clipped"
                                   + TELEMETRY)
        self.global_update_norm = gauge("global_update_norm", "|x_{t+1} - x_t|")
        self.sharpness = gauge("sharpness", "SAM sharpness of the global model")
        self.hessian = gauge("hessian_top_eigenvalue", "Top Hessian eigenvalue")
        self.sampled = counter("clients_sampled", "Clients sampled" + TELEMETRY)
        self.replied = counter("clients_replied", "Replies accepted into the aggregate" + TELEMETRY)
        self.failed = counter("clients_failed", "Clients that replied with an error or not at all"
                              + TELEMETRY, ("reason",))
        self.rejected = counter("clients_rejected", "Replies dropped by screening" + TELEMETRY,
                                ("reason",))
        self.declined = counter("clients_declined", "Sampled clients that declined the round "
                                "(e.g. no data)" + TELEMETRY, ("reason",))
        self.bytes_sent = counter("bytes_sent", "Array bytes sent to clients" + TELEMETRY)
        self.bytes_received = counter("bytes_received", "Array bytes received from clients"
                                      + TELEMETRY)
        self.update_norm = Histogram("plateau_update_norm", "Pre-clip client update norms"
                                     + TELEMETRY, LABELS, buckets=NORM_BUCKETS,
                                     registry=self.registry)
        self.round_duration = Histogram("plateau_round_duration_seconds", "Round wall time"
                                        + TELEMETRY, LABELS, buckets=DURATION_BUCKETS,
                                        registry=self.registry)
        self.rounds_planned.labels(**self.labels).set(config.num_server_rounds)
        caps = [c for c in (config.target_epsilon, config.max_epsilon) if c > 0]
        self.epsilon_budget.labels(**self.labels).set(min(caps, default=0.0))

    def serve(self) -> None:
        """Start the HTTP endpoint if ``metrics-port`` is set."""
        if not self.config.metrics_port:
            return
        self._server, _ = start_http_server(self.config.metrics_port,
                                            addr=self.config.metrics_addr,
                                            registry=self.registry)
        log(INFO, "metrics on http://%s:%d/metrics", self.config.metrics_addr,
            self.config.metrics_port)

    def observe_round(self, record: Mapping[str, Any], norms: list[float],
                      rejected: Mapping[str, int], failed: Mapping[str, int],
                      traffic: tuple[int, int]) -> None:
        """Update every metric from a round's record, then push if a Pushgateway is set."""
        labels = self.labels
        for metric, key in ((self.round, "round"), (self.accuracy, "test_accuracy"),
                            (self.test_loss, "test_loss"), (self.train_loss, "train_loss"),
                            (self.clip_fraction, "clip_fraction"),
                            (self.federated_accuracy, "federated_accuracy"),
                            (self.global_update_norm, "global_update_norm"),
                            (self.sharpness, "sharpness"),
                            (self.hessian, "hessian_top_eigenvalue")):
            value = record.get(key)
            if isinstance(value, int | float):
                metric.labels(**labels).set(value)
        if "epsilon" in record:  # a DP run: a number, or NaN when it claims none
            epsilon = record["epsilon"]
            self.epsilon.labels(**labels).set(
                epsilon if isinstance(epsilon, int | float) else float("nan"))
        for gauge, key in ((self.audit_lower_bound, "audit_epsilon_lower_bound"),
                           (self.audit_estimate, "audit_epsilon_estimate")):
            if isinstance(value := record.get(key), int | float):
                gauge.labels(**labels).set(value)
        if "epsilon_against_server" in record:  # a number, or NaN when the run claims none
            against_server = record["epsilon_against_server"]
            self.epsilon_server.labels(**labels).set(
                against_server if isinstance(against_server, int | float) else float("nan"))
        for partition, silo in (record.get("federated_silos") or {}).items():
            self.silo_accuracy.labels(**labels, partition=partition).set(silo["accuracy"])
        for partition, spent in (record.get("record_epsilon") or {}).items():
            self.record_epsilon.labels(**labels, partition=partition).set(spent)
        for partition, status in (record.get("record_budget") or {}).items():
            self.record_budget.labels(**labels, partition=partition).set(
                float(status == WITHIN_BUDGET))
        self.round_completed_time.labels(**labels).set(time.time())
        self.sampled.labels(**labels).inc(record.get("num_sampled") or 0)
        self.replied.labels(**labels).inc(record.get("num_clients") or 0)
        for reason, count in failed.items():
            self.failed.labels(**labels, reason=reason).inc(count)
        for reason, count in rejected.items():
            self.rejected.labels(**labels, reason=reason).inc(count)
        for reason, count in (record.get("declined") or {}).items():
            self.declined.labels(**labels, reason=reason).inc(count)
        for norm in norms:
            self.update_norm.labels(**labels).observe(norm)
        self.round_duration.labels(**labels).observe(record.get("wall_s") or 0.0)
        self.bytes_sent.labels(**labels).inc(traffic[0])
        self.bytes_received.labels(**labels).inc(traffic[1])
        self.push()

    def observe_audit(self, audit: Mapping[str, Any]) -> None:
        """The final in-run audit's two numbers, then push."""
        self.audit_lower_bound.labels(**self.labels).set(audit["epsilon_lower_bound"])
        estimate = audit.get("epsilon_estimate")
        self.audit_estimate.labels(**self.labels).set(
            estimate if isinstance(estimate, int | float) else float("nan"))
        self.push()

    def push(self) -> None:
        """Push to the Pushgateway (job ``plateau``, grouped by run); never fails the run."""
        if not self.config.metrics_pushgateway:
            return
        try:
            push_to_gateway(self.config.metrics_pushgateway, job="plateau",
                            grouping_key={"run": self.labels["run"]}, registry=self.registry)
        except OSError as err:
            log(WARNING, "metrics push to %s failed: %s", self.config.metrics_pushgateway, err)

    def close(self) -> None:
        """Keep the endpoint up for ``metrics-linger`` seconds, then stop it."""
        if self._server is None:
            return
        if self.config.metrics_linger > 0:
            time.sleep(self.config.metrics_linger)
        self._server.shutdown()
        self._server = None
