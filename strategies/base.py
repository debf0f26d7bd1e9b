"""Mechanics every Plateau strategy shares: sampling, broadcast, reply screening, aggregation.

An algorithm subclasses ``PlateauStrategy`` and says only what is specific to it: the local rule
its clients run (``local_rule``), the extra arrays it broadcasts (``broadcast``), extra round
scalars (``round_config``) and how the server turns the mean released vector into the next model
(``apply_update``). Clipping and noise come from the privacy mechanism the strategy is built with,
so every algorithm composes with every DP placement the same way.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import DEBUG, INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from plateau.accounting import RoundEvent
from plateau.canaries import CanaryClients
from plateau.config import ConfigError, RunConfig
from plateau.noise import secure_source
from plateau.privacy import (
    PrivacyMechanism,
    Tensors,
    flat_norm,
    released_dim,
    sum_updates,
    weighted_mean,
)
from plateau.sampling import ClientSampler, Cohort

from .shared import ServerState

UPDATE_KEY = "update"
IDENTITY_KEY = "identity"  # a node's answer to the partition query: partition-id, num-partitions
DECLINE_KEY = "decline"  # a client that takes no part in a round, with its reason
POPULATION_SETTLE_S = 1.0
BUFFERS_KEY = "buffers"
METRICS_KEY = "metrics"


class RejectedReply(ValueError):
    """Why a reply is dropped: a short fixed reason, counted per round."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _numpy_dtype(tensor: torch.Tensor) -> str:
    """The numpy dtype name a tensor of this dtype travels as (e.g. 'float32')."""
    return str(torch.empty(0, dtype=tensor.dtype).numpy().dtype)


@dataclass(frozen=True)
class ClientUpload:
    """One accepted reply: the released vector, buffer deltas and diagnostics."""

    node_id: int
    update: Tensors
    buffers: Tensors
    num_examples: int
    train_loss: float | None
    update_norm: float | None
    clipped: bool | None
    clip_error: float | None
    state_rounds: float | None
    test_seeded: bool = False
    record_epsilon: float | None = None  # the silo's own record-level epsilon (record-dp)
    # what the silo says it did: delta, noise multiplier per query, steps so far (record-dp)
    record_report: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundStats:
    """What happened to the replies of one round."""

    sampled: int = 0
    accepted: int = 0
    failed: int = 0
    missing: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    declined: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    bytes_received: int = 0
    norms: list[float] = field(default_factory=list)
    test_seeded_nodes: int = 0  # replies whose node drew its noise from PLATEAU_TEST_SEED
    canaries: int = 0  # uploads of the audit's canaries in the aggregate


@dataclass(frozen=True)
class Aggregate:
    """The round's released mean, with the public numbers it was formed with: what a server
    rule reads (never the individual uploads)."""

    mean: Tensors
    denominator: float  # the expected cohort under DP, the number of clients averaged otherwise
    population: int  # N, canaries included
    noise_multiplier: float | None = None  # the accounted noise on the sum, over C (None: no DP)
    # what the mechanism performed this round, for the ledger: the noise it added and the
    # sampling that chose the cohort (None without a formal guarantee)
    event: RoundEvent | None = None


@dataclass(frozen=True)
class RoundResult:
    """What one round's aggregation produced: the new model (None: unchanged), its metrics and
    what happened to the replies."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    stats: RoundStats
    event: RoundEvent | None = None  # the accounting event of the round's release


def short_reason(reason: str) -> str:
    """The last line of a client's error (Ray wraps it in a traceback), at most 200 chars."""
    lines = [line.strip(" '>") for line in reason.strip().splitlines() if line.strip(" '>")]
    return (lines[-1] if lines else reason)[:200]


def exchange(grid: Grid, messages: Iterable[Message], timeout: float,
             poll_interval: float) -> list[Message]:
    """Push messages and collect their replies, looking every ``poll_interval`` seconds.

    Flower's ``Grid.send_and_receive`` waits 3 s between pulls on a deployed SuperLink, which
    alone adds up to 3 s to every round; the replies and the timeout are the same.
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
    return replies


def array_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (configs and metrics are negligible)."""
    return sum(len(array.data) for record in content.array_records.values()
               for array in record.values())


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
        self.privacy = privacy
        self.device = torch.device(device)
        self.current: Tensors = {}
        self.frozen_digest = ""  # of the weights clients rebuild locally and never receive
        self.sampler = ClientSampler(config.sampling_method, config.sample_rate,
                                     secret=privacy is not None, seed=config.seed)
        self.population = 0  # N: the real clients plus the audit's canaries
        self.real_population = 0
        self.canaries: CanaryClients | None = None
        self._canary_state: Mapping[str, Any] | None = None  # from a checkpoint, until built
        # node id -> partition id: Flower draws node ids at random, so sampling and summing go
        # by partition, which is what makes a seeded run repeat exactly
        self.partitions: dict[int, int] = {}
        self.partition_counts: set[int] = set()  # num-partitions the nodes reported
        self.cohort = Cohort(nodes=[], expected=1.0, population=0)
        self.released_dim = 0  # coordinates each client releases (and noises) this round
        self.bytes_sent = 0
        # uploads each partition's node has handed the server: its epsilon against the server
        # (kept in the ledger, written before a round's results are released)
        self.participations: Counter[int] = Counter()
        # record-dp: each silo's (partition's) last reported epsilon, and the silos that
        # declined for lack of record-level budget
        self.record_epsilon: dict[int, float] = {}
        self.record_silos: dict[int, dict[str, float]] = {}  # each silo's last full report
        self.record_exhausted: set[int] = set()

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

    @staticmethod
    def as_record(tensors: Tensors) -> ArrayRecord:
        """Server state as an ArrayRecord to broadcast (on the CPU, where messages live)."""
        return ArrayRecord({k: v.detach().cpu() for k, v in tensors.items()})

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
        return {k: self.current[k] for k in self.parameter_names}

    def support(self, server_round: int) -> Tensors | None:
        """0/1 masks of the released coordinates, when the algorithm releases a public subset."""
        return None

    @abstractmethod
    def apply_update(self, server_round: int, aggregate: Aggregate) -> Tensors:
        """Next global parameters from the current ones and the round's released mean."""

    # ----- sampling and broadcast -------------------------------------------------------------

    def connected_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, once at least min-available-clients are there."""
        deadline = time.monotonic() + self.config.round_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of min-available-clients={self.min_available_nodes} "
                    f"nodes connected within round-timeout={self.config.round_timeout:g} s"
                )
            log(INFO, "Waiting for nodes: %d of %d connected", len(nodes),
                self.min_available_nodes)
            time.sleep(1.0)
        return nodes

    def determine_population(self, grid: Grid) -> int:
        """N: population-size, or the nodes connected when the first round starts (once their
        number has stopped changing: simulated SuperNodes register over a moment)."""
        if not self.population:
            connected, stable_since = len(self.connected_nodes(grid)), time.monotonic()
            while (not self.config.population_size
                   and time.monotonic() - stable_since < POPULATION_SETTLE_S):
                time.sleep(0.25)
                if (now := len(grid.get_node_ids())) != connected:
                    connected, stable_since = now, time.monotonic()
            self.real_population = self.config.population_size or connected
            self.population = self.real_population + self.config.audit_canaries
            log(INFO, "population N = %d (%s)%s", self.population,
                "population-size" if self.config.population_size else
                f"the {connected} nodes connected at the first round",
                f", of which {self.config.audit_canaries} are the audit's canaries"
                if self.config.audit_canaries else "")
        return self.population

    def identify(self, grid: Grid, nodes: Iterable[int]) -> None:
        """Ask every node not yet known for its partition-id (one QUERY message each, once).

        A node that does not answer, answers badly, or claims a partition outside the population
        or one another node holds is left out of sampling (and logged): only partitions the
        population accounts for can ever be sampled.
        """
        unknown = [node for node in nodes if node not in self.partitions]
        if not unknown:
            return
        # the run config rides along: a node can prepare its model and data before round 1
        question = RecordDict({"config": ConfigRecord({**self.config.to_dict(),
                                                       "question": "partition-id"})})
        messages = [Message(content=question, message_type=MessageType.QUERY, dst_node_id=node)
                    for node in unknown]
        taken = set(self.partitions.values())
        for answer in exchange(grid, messages, self.config.round_timeout,
                               self.config.reply_poll_interval):
            node = answer.metadata.src_node_id
            identity = (None if answer.has_error()
                        else answer.content.metric_records.get(IDENTITY_KEY))
            partition = identity.get("partition-id") if identity is not None else None
            if not isinstance(partition, int) or not 0 <= partition < self.real_population:
                log(WARNING, "node %d did not give a partition-id in 0..%d (%s): left out",
                    node, self.real_population - 1, short_reason(answer.error.reason)
                    if answer.has_error() else partition)
            elif partition in taken:
                log(WARNING, "node %d claims partition %d, which another node holds: left out",
                    node, partition)
            else:
                self.partitions[node] = partition
                taken.add(partition)
                if isinstance(count := identity.get("num-partitions"), int) and count > 0:
                    self.partition_counts.add(count)

    def slots(self, grid: Grid) -> dict[int, int]:
        """Partition id -> node id of the identified, connected nodes."""
        connected = self.connected_nodes(grid)
        self.identify(grid, connected)
        slots = {self.partitions[node]: node for node in connected if node in self.partitions}
        if not slots:
            raise RuntimeError(f"none of the {len(connected)} connected nodes answered the "
                               "partition query with a partition-id within round-timeout="
                               f"{self.config.round_timeout:g} s")
        return slots

    def identified_partition_counts(self, grid: Grid) -> list[int]:
        """Identify the connected nodes now; the num-partitions values they reported."""
        self.slots(grid)
        return sorted(self.partition_counts)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample a cohort and send it the model, the algorithm's state and the round config."""
        self.current = {
            k: v.to(self.device) for k, v in arrays.to_torch_state_dict().items()
        }
        population = self.determine_population(grid)
        self.cohort = self.sampler.sample(self.slots(grid), population, server_round)
        if self.config.audit_canaries and self.canaries is None:
            self.canaries = CanaryClients(self.config.audit_canaries, self.real_population,
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
            len(self.cohort.nodes), population, self.cohort.expected)
        content = RecordDict({"arrays": self.broadcast_model(server_round, arrays),
                              **self.broadcast(server_round), "config": round_config})
        self.bytes_sent = array_bytes(content) * len(self.cohort.nodes)
        return [
            Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)
            for node_id in self.cohort.nodes
        ]

    # ----- replies ----------------------------------------------------------------------------

    def _screen(self, msg: Message) -> ClientUpload | str:
        """Accept a reply, or say why it is rejected; nothing here trusts the client."""
        if msg.has_error():
            return "client-error"
        content = msg.content
        if set(content.keys()) == {DECLINE_KEY} and DECLINE_KEY in content.config_records:
            reason = str(content.config_records[DECLINE_KEY].get("reason", "unknown"))
            return "declined:" + (reason if reason.replace("-", "").isalnum() else "unknown")[:40]
        if UPDATE_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
            return "malformed"
        expected_arrays = {UPDATE_KEY, BUFFERS_KEY} if self.buffer_names else {UPDATE_KEY}
        if (set(content.array_records) != expected_arrays
                or set(content.metric_records) != {METRICS_KEY} or content.config_records):
            return "unexpected-record"
        if self.buffer_names and BUFFERS_KEY not in content.array_records:
            return "malformed"
        try:
            update = self._tensors(content.array_records[UPDATE_KEY], self.release_template())
            buffers = (
                self._tensors(content.array_records[BUFFERS_KEY],
                              {k: self.current[k] for k in self.buffer_names})
                if self.buffer_names else {}
            )
        except RejectedReply as err:
            return err.reason
        metrics = content.metric_records[METRICS_KEY]
        num_examples = metrics.get("num-examples")
        if not isinstance(num_examples, int) or num_examples <= 0:
            return "bad-metrics"
        norm = flat_norm(update)
        if self.privacy is not None and (reason := self.privacy.screen(
                norm, self.released_dim, self.cohort.expected)) is not None:
            return reason
        loss, pre_clip, clipped, error, state_rounds, record_epsilon = (metrics.get(k) for k in (
            "train-loss", "update-norm", "clipped", "clip-error", "state-rounds",
            "record-epsilon"))
        if self.config.record_dp == "on" and not isinstance(record_epsilon, int | float):
            return "bad-metrics"  # a silo under record-level DP says what it has spent
        return ClientUpload(
            node_id=msg.metadata.src_node_id,
            update=update,
            buffers=buffers,
            num_examples=num_examples,
            train_loss=float(loss) if isinstance(loss, int | float) and math.isfinite(loss)
            else None,
            update_norm=float(pre_clip) if isinstance(pre_clip, int | float)
            else (norm if self.privacy is None else None),
            clipped=bool(clipped) if isinstance(clipped, int | float) else None,
            clip_error=float(error) if isinstance(error, int | float) else None,
            state_rounds=float(state_rounds) if isinstance(state_rounds, int | float) else None,
            test_seeded=bool(metrics.get("test-seeded", 0)),
            record_epsilon=float(record_epsilon) if isinstance(record_epsilon, int | float)
            and record_epsilon >= 0 else None,
            record_report={k: float(v) for k in ("record-delta", "record-noise-multiplier",
                                                 "record-steps")
                           if isinstance(v := metrics.get(k), int | float)},
        )

    def _tensors(self, record: ArrayRecord, template: Tensors) -> Tensors:
        """Tensors of a record with exactly the expected names, shapes and dtypes, all finite.

        Array metadata is checked before any bytes are decoded; whatever else goes wrong while
        decoding a client's bytes is a malformed reply, never an exception that stops the run.
        """
        if sorted(record.keys()) != sorted(template):
            raise RejectedReply("wrong-keys")
        tensors = {}
        for name, expected in template.items():
            array = record[name]
            if getattr(array, "stype", None) != "numpy.ndarray":
                raise RejectedReply("malformed")
            if tuple(array.shape) != tuple(expected.shape):
                raise RejectedReply("wrong-shape")
            if array.dtype != _numpy_dtype(expected):
                raise RejectedReply("wrong-dtype")
            try:
                tensor = torch.from_numpy(np.array(array.numpy()))
            except Exception:  # noqa: BLE001 - undecodable bytes from a client
                raise RejectedReply("malformed") from None
            if tuple(tensor.shape) != tuple(expected.shape) or tensor.dtype != expected.dtype:
                raise RejectedReply("malformed")
            if not torch.isfinite(tensor).all():
                raise RejectedReply("non-finite")
            tensors[name] = tensor.to(self.device)
        return tensors

    def accept_replies(self, replies: Iterable[Message]
                       ) -> tuple[list[ClientUpload], RoundStats]:
        """Screen every reply; count and log the rejected ones (one upload per node at most,
        and only from nodes this round sampled)."""
        stats = RoundStats(sampled=len(self.cohort.nodes), bytes_sent=self.bytes_sent)
        uploads: list[ClientUpload] = []
        seen: set[int] = set()
        sampled = set(self.cohort.nodes)
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if not msg.has_error():
                stats.bytes_received += array_bytes(msg.content)
                if node_id in sampled and node_id not in seen:
                    self.participations[self.partitions.get(node_id, -1 - node_id)] += 1
                metrics = msg.content.metric_records.get(METRICS_KEY)
                if metrics is not None and metrics.get("test-seeded"):
                    stats.test_seeded_nodes += 1
            if node_id in seen:
                verdict: ClientUpload | str = "duplicate"
            elif node_id not in sampled:
                verdict = "not-sampled"
            else:
                verdict = self._screen(msg)
            seen.add(node_id)
            partition = self.partitions.get(node_id, -1 - node_id)
            if isinstance(verdict, ClientUpload):
                uploads.append(verdict)
                if verdict.record_epsilon is not None:
                    self.record_epsilon[partition] = verdict.record_epsilon
                    self.record_silos[partition] = {
                        "epsilon": verdict.record_epsilon, "records": verdict.num_examples,
                        **{k.removeprefix("record-").replace("-", "_"): v
                           for k, v in verdict.record_report.items()}}
            elif verdict.startswith("declined:"):
                stats.declined[verdict.removeprefix("declined:")] += 1
                if verdict == "declined:record-budget":
                    self.record_exhausted.add(partition)
            elif verdict == "client-error":
                stats.failed += 1
                log(WARNING, "node %d failed: %s", node_id, short_reason(msg.error.reason))
            else:
                stats.rejected[verdict] += 1
                log(WARNING, "rejected the reply of node %d: %s", node_id, verdict)
        stats.missing = len(sampled - seen)
        # summed in partition order: floating-point sums then repeat exactly, run after run
        uploads.sort(key=lambda upload: self.partitions.get(upload.node_id, upload.node_id))
        uploads = self._drop_outliers(uploads, stats)
        stats.accepted = len(uploads)
        stats.norms = [u.update_norm for u in uploads if u.update_norm is not None]
        return uploads, stats

    def _drop_outliers(self, uploads: list[ClientUpload], stats: RoundStats
                       ) -> list[ClientUpload]:
        """Without DP, drop updates longer than norm-outlier-factor x the round's median."""
        factor = self.config.norm_outlier_factor
        if self.privacy is not None or factor <= 0 or len(uploads) < 3:
            return uploads
        norms = [flat_norm(u.update) for u in uploads]
        bound = factor * float(np.median(norms))
        kept = []
        for upload, norm in zip(uploads, norms, strict=True):
            if norm > bound:
                stats.rejected["norm-outlier"] += 1
                log(WARNING, "rejected the reply of node %d: norm %.4g > %g x median",
                    upload.node_id, norm, factor)
            else:
                kept.append(upload)
        return kept

    # ----- checkpoints ------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything the server knows besides the model: algorithm state and population. Never
        a generator or sampler state: a resumed run draws fresh noise and fresh cohorts."""
        return {
            "tensors": {name: piece.state_dict() for name, piece in self.state_pieces().items()},
            "population": self.population,
            "canaries": self.canaries.state_dict() if self.canaries is not None else None,
            "record_epsilon": dict(self.record_epsilon),
            "record_silos": dict(self.record_silos),
            "record_exhausted": sorted(self.record_exhausted),
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
        self.population = int(state["population"])
        self.real_population = self.population - self.config.audit_canaries
        self._canary_state = state.get("canaries")
        self.record_epsilon = {int(k): float(v)
                               for k, v in state.get("record_epsilon", {}).items()}
        self.record_exhausted = {int(k) for k in state.get("record_exhausted", [])}
        self.record_silos = {int(k): dict(v) for k, v in state.get("record_silos", {}).items()}

    def max_participations(self) -> int:
        """The most uploads any one client (partition) has handed the server in this run."""
        return max(self.participations.values(), default=0)

    # ----- aggregation ------------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's interface to ``train_round``: the new model and the round's metrics."""
        result = self.train_round(server_round, replies)
        return result.arrays, result.metrics

    def train_round(self, server_round: int, replies: Iterable[Message]) -> RoundResult:
        """Screen, privatise and average the released vectors, then apply the algorithm's rule."""
        uploads, stats = self.accept_replies(replies)
        if not uploads and self.privacy is None:
            log(WARNING, "round %d: no usable replies; the model is unchanged", server_round)
            return RoundResult(None, None, stats)
        template = self.release_template()
        if self.privacy is not None:
            support = self.support(server_round)
            canary_uploads = (self.canaries.uploads(self.cohort.slots, self.privacy,
                                                    self.cohort.expected, template,
                                                    server_round, support)
                              if self.canaries is not None else [])
            stats.canaries = len(canary_uploads)
            mean = self.privacy.aggregate(
                [u.update for u in uploads] + canary_uploads, self.cohort.expected, template,
                secure_source("server-noise", server_round), support=support,
            )
            if self.canaries is not None:
                self.canaries.observe(mean)
            # the mean's denominator under DP is the public expected cohort
            multiplier = self.privacy.accounted_noise_multiplier(self.cohort.expected)
            event = None if multiplier is None else RoundEvent(
                noise_multiplier=multiplier, sampling=self.sampler.method,
                population=self.population, sample_rate=self.sampler.sample_rate,
                cohort=self.sampler.cohort_size(self.population))
            aggregate = Aggregate(mean, self.cohort.expected, self.population, multiplier, event)
        else:
            weights = [
                float(u.num_examples) if self.config.weighting == "num-examples" else 1.0
                for u in uploads
            ]
            aggregate = Aggregate(weighted_mean([u.update for u in uploads], weights, template),
                                  float(len(uploads)), self.population)
        new_params = self.apply_update(server_round, aggregate)
        new_state = dict(self.current)
        new_state.update(new_params)
        if self.buffer_names and uploads:
            buffer_sum = sum_updates([u.buffers for u in uploads],
                                     {k: self.current[k] for k in self.buffer_names})
            new_state.update({k: self.current[k] + v / len(uploads)
                              for k, v in buffer_sum.items()})
        global_update = {k: new_state[k] - self.current[k] for k in self.parameter_names}
        self.current = new_state
        return RoundResult(self.as_record(new_state),
                           self._metrics(uploads, global_update, stats), stats, aggregate.event)

    def _metrics(self, uploads: list[ClientUpload], global_update: Tensors,
                 stats: RoundStats) -> MetricRecord:
        metrics: dict[str, int | float] = {
            "num-sampled": stats.sampled,
            "expected-cohort": self.cohort.expected,
            "population": self.population,
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
        if self.privacy is not None:
            multiplier = self.privacy.effective_noise_multiplier(self.cohort.expected,
                                                                 self.released_dim)
            if multiplier is not None:
                metrics["effective-noise-multiplier"] = multiplier
        for piece in self.state_pieces().values():
            metrics.update(piece.metrics())
        metrics.update(self.round_metrics())
        return MetricRecord(metrics)

    def round_metrics(self) -> dict[str, float]:
        """Metrics of the algorithm's own server rule this round (none by default)."""
        return {}

    def summary(self) -> None:
        """Log the algorithm and its privacy mechanism."""
        log(INFO, "%s: local rule %r, sample rate %.3f, K=%d, privacy %s",
            type(self).__name__, self.local_rule, self.config.sample_rate,
            self.config.local_steps, self.privacy or "off")
        cfg = self.config
        if cfg.record_dp == "on":
            sigma = (f"calibrated per silo to epsilon <= {cfg.record_target_epsilon:g}"
                     if cfg.record_target_epsilon > 0 else
                     f"sigma {cfg.record_noise_multiplier:g}")
            log(INFO, "record-level DP in every silo: clip %g per record, %s, %s accountant, "
                "%s per-sample clipping; each silo keeps and enforces its own budget",
                cfg.record_clip_norm, sigma, cfg.record_accountant, cfg.record_per_sample)

