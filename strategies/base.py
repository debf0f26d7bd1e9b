"""The strategy every Plateau algorithm is: composed pieces under one thin Flower adapter.

A round goes through pieces, each written once and each replaceable:

* ``ClientPopulation`` (population.py): N, the nodes' partitions, the round's cohort;
* ``ReplyScreener`` (screening.py): replies to typed ``ClientUpload`` s plus the round's stats;
* an ``Aggregation`` (aggregation.py): the uploads to one released mean, with or without
  client-level DP (the privacy placement lives inside the mechanism), and the accounting event
  it performed;
* the algorithm's server state (shared.py: momentum, global direction, control variate,
  dynamic regulariser), held as ``ServerState`` attributes the checkpoint finds by itself;
* the algorithm's rule: what it broadcasts (``broadcast``, ``broadcast_model``,
  ``round_config``), what its clients release (``release_template``, ``support``) and how the
  released mean moves the model (``apply_update``).

Flower sees ``configure_train`` and ``aggregate_train``; the round loop calls ``train_round``,
which returns values (``RoundResult``), not side channels.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import DEBUG, INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from plateau.config import ConfigError, RunConfig
from plateau.messages import CONFIG_KEY, MODEL_KEY, array_bytes, tensors_record
from plateau.privacy.accounting import RoundEvent
from plateau.privacy.canaries import CanaryClients
from plateau.privacy.mechanism import (
    PrivacyMechanism,
    Tensors,
    flat_norm,
    released_dim,
    sum_updates,
)
from plateau.privacy.sampling import Cohort

from .aggregation import Aggregate, Aggregation, aggregation_for
from .population import ClientPopulation
from .screening import ClientUpload, Expected, ReplyScreener, RoundStats
from .shared import ServerState


@dataclass(frozen=True)
class RoundResult:
    """What one round's aggregation produced: the new model (None: unchanged), its metrics and
    what happened to the replies."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    stats: RoundStats
    event: RoundEvent | None = None  # the accounting event of the round's release


WITHIN_BUDGET, OUT_OF_BUDGET = "within budget", "out of budget"


@dataclass
class SiloBudgets:
    """Record-level DP: where each silo (partition) stands with its own budget, as its replies
    say (it trained: within budget; it declined for lack of budget: out of budget), and the
    numbers of the silos that publish them (``client_app.compute.SiloRound.report``)."""

    status: dict[int, str] = field(default_factory=dict)
    epsilon: dict[int, float] = field(default_factory=dict)
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def exhausted(self) -> set[int]:
        """Silos whose last word was that their budget is spent."""
        return {p for p, status in self.status.items() if status == OUT_OF_BUDGET}

    def observe(self, uploads: Iterable[ClientUpload], stats: RoundStats,
                partition_of: Any) -> None:
        """Take in what this round's silos reported (uploads) or declined (stats)."""
        for upload in uploads:
            partition = partition_of(upload.node_id)
            self.status[partition] = WITHIN_BUDGET
            if upload.record_epsilon is None:
                continue
            report = {k.removeprefix("record-").replace("-", "_"): v
                      for k, v in upload.record_report.items()}
            substitution = bool(report.pop("substitution", 1.0))
            self.epsilon[partition] = upload.record_epsilon
            self.reports[partition] = {
                "epsilon": upload.record_epsilon,
                "adjacency": "substitution" if substitution else "add/remove",
                # the count a record-only run weights by (1 under client-level DP: none)
                **({"records": upload.num_examples} if upload.num_examples > 1 else {}),
                **report}
        for node in stats.out_of_record_budget:
            self.status[partition_of(node)] = OUT_OF_BUDGET

    def state_dict(self) -> dict[str, Any]:
        return {"record_epsilon": dict(self.epsilon), "record_silos": dict(self.reports),
                "record_status": dict(self.status)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epsilon = {int(k): float(v) for k, v in state.get("record_epsilon", {}).items()}
        self.reports = {int(k): dict(v) for k, v in state.get("record_silos", {}).items()}
        self.status = {int(k): str(v) for k, v in state.get("record_status", {}).items()}
        for partition in state.get("record_exhausted", []):  # checkpoints before the statuses
            self.status[int(partition)] = OUT_OF_BUDGET


class PlateauStrategy(FedAvg):
    """Base of every Plateau algorithm, built on Flower's message-based ``FedAvg``.

    Parameters
    ----------
    config : RunConfig
        The validated run config; the whole of it travels to clients in every message, so client
        and server can never disagree on a hyper-parameter.
    parameter_names : list[str]
        Trainable tensors of the model: the released (clipped, noised) vector.
    buffer_names : list[str]
        Floating-point buffers (BatchNorm statistics), averaged in the clear; empty under DP
        unless the user opted in with ``dp-allow-batchnorm``.
    privacy : PrivacyMechanism | None
        The client-level DP mechanism, or None for non-private training.
    device : torch.device
        Where the server keeps the model and draws central noise.
    clients : ClientPopulation | None
        The population, when the loop has already asked the nodes who they are.
    """

    local_rule: str = "sgd"
    paper: str = ""
    server_state: str = "x"
    client_state: str = ""
    released: str = "update"

    def __init__(
        self,
        config: RunConfig,
        *,
        parameter_names: list[str],
        buffer_names: list[str],
        privacy: PrivacyMechanism | None = None,
        device: torch.device | str = "cpu",
        clients: ClientPopulation | None = None,
    ) -> None:
        super().__init__(
            fraction_train=config.sample_rate,
            min_train_nodes=1,
            min_available_nodes=config.min_available_clients,
        )
        # Evaluation is central (server-side); no client is ever asked to evaluate.
        self.fraction_evaluate, self.min_evaluate_nodes = 0.0, 0
        self.config = config
        self.parameter_names = list(parameter_names)
        self.buffer_names = list(buffer_names)
        self.device = torch.device(device)
        self.current: Tensors = {}
        self.frozen_digest = ""  # of the weights clients rebuild locally and never receive
        # the loop may have identified the nodes already (dataset='local': their schemas
        # decide the model)
        self.clients = clients or ClientPopulation(config, secret=privacy is not None)
        self.privacy = privacy  # also builds the screener and the aggregation
        self.canaries: CanaryClients | None = None
        self._canary_state: Mapping[str, Any] | None = None  # from a checkpoint, until built
        self.cohort = Cohort(nodes=[], expected=1.0, population=0)
        self.released_dim = 0  # coordinates each client releases (and noises) this round
        self.bytes_sent = 0
        # uploads each partition's node has handed the server: its epsilon against the server
        # (kept in the ledger, written before a round's results are released)
        self.participations: Counter[int] = Counter()
        # the most any client had handed the server before a resume (the ledger keeps only
        # that maximum): added to this run's counts, an upper bound on any client's total
        self.earlier_participations = 0
        self.silos = SiloBudgets()

    def reconfigure(self, config: RunConfig, privacy: PrivacyMechanism | None) -> None:
        """The run's final config (resolved run name, calibrated or resumed sigma) and its
        mechanism, for every piece that reads them: the loop calls this once before round 1."""
        self.config = config
        self.clients.config = config
        self.privacy = privacy

    @property
    def privacy(self) -> PrivacyMechanism | None:
        """The client-level DP mechanism (None: no privacy)."""
        return self.aggregation.mechanism

    @privacy.setter
    def privacy(self, mechanism: PrivacyMechanism | None) -> None:
        """Wire a mechanism (the loop does after calibrating sigma) into the screener and the
        aggregation: the two pieces that must agree on it."""
        self.screener = ReplyScreener(self.config, mechanism, self.device)
        self.aggregation: Aggregation = aggregation_for(mechanism, self.clients.sampler,
                                                        self.config.weighting)

    # ----- what an algorithm specialises ------------------------------------------------------

    def trainable(self) -> Tensors:
        """The current trainable parameters: what server state and released means cover."""
        return {k: self.current[k] for k in self.parameter_names}

    def state_pieces(self) -> dict[str, ServerState]:
        """The server state this strategy holds (its ``ServerState`` attributes), by name: what
        a checkpoint carries. Found, not listed, so no piece can be left out of a resume."""
        pieces: dict[str, ServerState] = {}
        for piece in vars(self).values():
            if isinstance(piece, ServerState):
                if piece.name in pieces:
                    raise TypeError(f"{type(self).__name__} holds two server states named "
                                    f"{piece.name!r}")
                pieces[piece.name] = piece
        return pieces

    def learning_rate(self, server_round: int) -> float:
        """Local learning rate of a round: lr * lr_decay^(round - 1)."""
        return self.config.lr * self.config.lr_decay ** (server_round - 1)

    def step_scale(self, server_round: int) -> float:
        """K * lr_t: how far K local steps along a unit gradient move a client this round."""
        return self.config.local_steps * self.learning_rate(server_round)

    def broadcast(self, server_round: int) -> dict[str, ArrayRecord]:
        """Extra ArrayRecords sent next to the model (momentum, global direction, ...)."""
        return {}

    def round_config(self, server_round: int) -> dict[str, bool | int | float | str]:
        """Extra scalars for this round's clients."""
        return {}

    def broadcast_model(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The model clients start from (FedACG sends a look-ahead instead of x_t)."""
        return arrays

    def release_template(self) -> Tensors:
        """Names and shapes of the vector each client releases: the trainable parameters, plus
        whatever else the algorithm uploads (e.g. SCAFFOLD's control-variate delta). Everything
        in it is clipped and noised together."""
        return self.trainable()

    def support(self, server_round: int) -> Tensors | None:
        """0/1 masks of the released coordinates, when the algorithm releases a public subset."""
        return None

    @abstractmethod
    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """Next global parameters from the current ones and the round's released mean."""

    def round_metrics(self) -> dict[str, float]:
        """Metrics of the algorithm's own server rule this round (none by default)."""
        return {}

    # ----- Flower's interface -----------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample a cohort and send it the model, the algorithm's state and the round config."""
        self.current = {
            k: v.to(self.device) for k, v in arrays.to_torch_state_dict().items()
        }
        self.cohort = self.clients.sample(grid, server_round)
        if self.config.audit_canaries and self.canaries is None:
            self.canaries = CanaryClients(self.config.audit_canaries,
                                          self.clients.real_population,
                                          self.release_template(), self.config.clip_norm)
            if self._canary_state is not None:
                self.canaries.load_state_dict(self._canary_state)
        self.released_dim = released_dim(self.release_template(), self.support(server_round))
        round_config = ConfigRecord({
            **config,
            **self.config.to_dict(),
            **self.round_config(server_round),
            "server-round": server_round,
            "round-lr": self.learning_rate(server_round),
            "expected-cohort": self.cohort.expected,
            "local-rule": self.local_rule,
            "frozen-digest": self.frozen_digest,
        })
        log(DEBUG, "configure_train: sampled %d of N = %d (expected %.1f)",
            len(self.cohort.nodes), self.clients.population, self.cohort.expected)
        content = RecordDict({MODEL_KEY: self.broadcast_model(server_round, arrays),
                              **self.broadcast(server_round), CONFIG_KEY: round_config})
        self.bytes_sent = array_bytes(content) * len(self.cohort.nodes)
        return [
            Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)
            for node_id in self.cohort.nodes
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's interface to ``train_round``: the new model and the round's metrics."""
        result = self.train_round(server_round, replies)
        return result.arrays, result.metrics

    # ----- the round --------------------------------------------------------------------------

    def accept_replies(self, server_round: int, replies: Iterable[Message]
                       ) -> tuple[list[ClientUpload], RoundStats]:
        """Screen the round's replies (the screener) and count what each partition released."""
        expected = Expected(self.release_template(),
                            {k: self.current[k] for k in self.buffer_names},
                            self.released_dim, self.cohort, self.support(server_round))
        uploads, stats = self.screener.accept(replies, expected, self.clients.partition_of)
        stats.bytes_sent = self.bytes_sent
        self.participations.update(self.clients.partition_of(node) for node in stats.handed)
        # a silo's report counts even when its update is then dropped as an outlier: it has
        # charged its own ledger for the reply
        self.silos.observe(uploads, stats, self.clients.partition_of)
        return self.screener.drop_outliers(uploads, stats), stats

    def next_event(self) -> RoundEvent | None:
        """The accounting event the next round's aggregation will perform: what the budget
        check must compose, from the mechanism actually wired in (not the plan)."""
        return self.aggregation.event(self.clients.population)

    def train_round(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        """Screen, aggregate (privately or not) and apply the algorithm's rule."""
        uploads, stats = self.accept_replies(server_round, replies)
        template, support = self.release_template(), self.support(server_round)
        canary_uploads = (self.canaries.uploads(self.cohort.slots, self.privacy,
                                                self.cohort.expected, template,
                                                server_round, support)
                          if self.canaries is not None and self.privacy is not None else [])
        stats.canaries = len(canary_uploads)
        aggregate = self.aggregation.aggregate(uploads, canary_uploads, self.cohort, template,
                                               support, server_round, self.clients.population)
        if aggregate is None:
            log(WARNING, "round %d: no usable replies; the model is unchanged", server_round)
            return RoundResult(None, None, stats)
        if self.canaries is not None:
            self.canaries.observe(aggregate.mean)  # the audit sees the sum it must test
            aggregate = self.without_canaries(aggregate, template, support)
        new_state = dict(self.current)
        new_state.update(self.apply_update(server_round, aggregate))
        if self.buffer_names and uploads:
            buffer_sum = sum_updates([u.buffers for u in uploads],
                                     {k: self.current[k] for k in self.buffer_names})
            new_state.update({k: self.current[k] + v / len(uploads)
                              for k, v in buffer_sum.items()})
        global_update = {k: new_state[k] - self.current[k] for k in self.parameter_names}
        self.current = new_state
        return RoundResult(tensors_record(new_state),
                           self._metrics(uploads, global_update, stats), stats, aggregate.event)

    def without_canaries(self, aggregate: Aggregate, template: Tensors,
                         support: Tensors | None) -> Aggregate:
        """The released mean as the model uses it: the sampled canaries' clipped updates taken
        out of the sum (the server inserted them: post-processing; their noise shares stay),
        and the sum divided by the real clients' share of the expected cohort, a public number.
        Without this, k canaries beside N clients divide every real update by q(N + k)."""
        assert self.canaries is not None
        canaries = self.canaries.contribution(self.cohort.slots, template, support)
        real = aggregate.denominator * (self.clients.real_population
                                        / max(self.clients.population, 1))
        if real <= 0:
            return aggregate
        mean = {k: (aggregate.mean[k] * aggregate.denominator - canaries[k]) / real
                for k in aggregate.mean}
        return dataclasses.replace(aggregate, mean=mean, denominator=real)

    def _metrics(self, uploads: list[ClientUpload], global_update: Tensors,
                 stats: RoundStats) -> MetricRecord:
        metrics: dict[str, int | float] = {
            "num-sampled": stats.sampled,
            "expected-cohort": self.cohort.expected,
            "population": self.clients.population,
            "num-clients": stats.accepted,
            "num-failed": stats.failed,
            "num-rejected": sum(stats.rejected.values()),
            "num-declined": sum(stats.declined.values()),
            "num-canaries": stats.canaries,
            "global-update-norm": flat_norm(global_update),
        }
        losses = [u.train_loss for u in uploads if u.train_loss is not None]
        if losses:
            metrics["train-loss"] = float(np.mean(losses))
        for name, values in (
            ("mean-update-norm", [u.update_norm for u in uploads]),
            ("clip-fraction", [u.clipped for u in uploads]),
            ("mean-clip-error", [u.clip_error for u in uploads]),
            ("mean-state-rounds", [u.state_rounds for u in uploads]),
        ):
            known = [float(v) for v in values if v is not None]
            if known:
                metrics[name] = float(np.mean(known))
        metrics.update(self.aggregation.metrics(self.cohort, self.released_dim))
        for piece in self.state_pieces().values():
            metrics.update(piece.metrics())
        metrics.update(self.round_metrics())
        return MetricRecord(metrics)

    # ----- checkpoints ------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything the server knows besides the model: algorithm state and population. Never
        a generator or sampler state: a resumed run draws fresh noise and fresh cohorts."""
        return {
            "tensors": {name: piece.state_dict() for name, piece in self.state_pieces().items()},
            **self.clients.state_dict(),
            "canaries": self.canaries.state_dict() if self.canaries is not None else None,
            **self.silos.state_dict(),
        }

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Load what ``checkpoint_state`` saved (secret state in an old checkpoint is ignored).

        Refused, before anything is set: state of another algorithm (other names), and tensors
        whose names or shapes are not the model's (``current`` must be loaded first)."""
        saved, pieces = state["tensors"], self.state_pieces()
        if set(saved) != set(pieces):
            raise ConfigError(f"resume refused: the checkpoint holds server state {sorted(saved)}; "
                              f"{type(self).__name__} keeps {sorted(pieces)}")
        for name, tensors in saved.items():
            pieces[name].check(tensors, self.current)
        for name, tensors in saved.items():
            pieces[name].load_state_dict(tensors, self.device)
        self.clients.load_state_dict(state)
        self._canary_state = state.get("canaries")
        self.silos.load_state_dict(state)

    def max_participations(self) -> int:
        """At least the most uploads any one client (partition) has handed the server in this
        run: exact until a resume, an upper bound after it."""
        return self.earlier_participations + max(self.participations.values(), default=0)

    def summary(self) -> None:
        """Log the algorithm and its privacy mechanism."""
        log(INFO, "%s: local rule %r, sample rate %.3f, K=%d, privacy %s",
            type(self).__name__, self.local_rule, self.config.sample_rate,
            self.config.local_steps, self.aggregation)
        cfg = self.config
        if cfg.record_dp == "on":
            sigma = (f"calibrated per silo to epsilon <= {cfg.record_target_epsilon:g}"
                     if cfg.record_target_epsilon > 0 else
                     f"sigma {cfg.record_noise_multiplier:g}")
            log(INFO, "record-level DP in every silo: clip %g per record, %s, %s per-sample "
                "clipping; each silo keeps and enforces its own budget and delta (add/remove, "
                "%s accountant, for silos with record-public-size; substitution, PLD, for the "
                "others)", cfg.record_clip_norm, sigma, cfg.record_per_sample,
                cfg.record_accountant)
