"""Reply screening: every reply is accepted as a typed ``ClientUpload`` or rejected with a short
fixed reason, counted in the round's ``RoundStats``. Nothing here trusts the client: array
metadata is checked before any bytes are decoded, and whatever goes wrong while decoding is a
rejection, never an exception that stops the run."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.common import log

from plateau.config import RunConfig
from plateau.messages import (
    BUFFERS_KEY,
    DECLINE_KEY,
    METRICS_KEY,
    UPDATE_KEY,
    array_bytes,
    short_reason,
    unpack_record,
)
from plateau.privacy.mechanism import PrivacyMechanism, Tensors, flat_norm
from plateau.privacy.sampling import Cohort

# what a silo may report of its record-level privacy beside its epsilon (record-dp)
RECORD_REPORT = ("record-delta", "record-noise-multiplier", "record-steps",
                 "record-public-size", "record-substitution")


class RejectedReply(ValueError):
    """Why a reply is dropped: a short fixed reason, counted per round."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    # record-dp: the silo's own record-level epsilon, where it publishes one (a silo under
    # client-level DP keeps it unless it declared a public size or chose to publish)
    record_epsilon: float | None = None
    # what the silo says it did: delta, noise multiplier per query, steps so far, its public
    # size and whether its accounting is substitution (record-dp, where published)
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
    # nodes that handed the server an upload (accepted or not): what each one has released
    handed: list[int] = field(default_factory=list)
    # nodes that declined for lack of record-level budget (record-dp)
    out_of_record_budget: list[int] = field(default_factory=list)


def _numpy_dtype(tensor: torch.Tensor) -> str:
    """The numpy dtype name a tensor of this dtype travels as (e.g. 'float32')."""
    return str(torch.empty(0, dtype=tensor.dtype).numpy().dtype)


def decode(record: ArrayRecord, template: Tensors, device: torch.device) -> Tensors:
    """Tensors of a record with exactly the template's names, shapes and dtypes, all finite
    (``RejectedReply`` otherwise). A packed record is unpacked first (``exchange`` leaves the
    ones it could not unpack as they came)."""
    try:
        record = unpack_record(record)
    except Exception:  # noqa: BLE001 - ValueError by design; anything else a client's bytes raise
        raise RejectedReply("malformed") from None
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
        tensors[name] = tensor.to(device)
    return tensors


@dataclass(frozen=True)
class Expected:
    """What this round's replies must look like: the released vector's and the buffers'
    templates, and the public numbers the privacy screen checks a norm against."""

    release: Tensors
    buffers: Tensors
    released_dim: int
    cohort: Cohort
    support: Tensors | None = None  # the round's public subset of released coordinates


class ReplyScreener:
    """Screens a round's replies into accepted uploads and the round's stats.

    Parameters
    ----------
    config : RunConfig
        ``record-dp`` (a silo under record-level DP must report its epsilon) and
        ``norm-outlier-factor`` (without DP, updates longer than this times the round's median
        norm are dropped).
    privacy : PrivacyMechanism | None
        Under DP, its ``screen`` rejects a norm no honest client of the mechanism can send.
    device : torch.device
        Where accepted tensors go.
    """

    def __init__(self, config: RunConfig, privacy: PrivacyMechanism | None,
                 device: torch.device) -> None:
        self.config = config
        self.privacy = privacy
        self.device = device

    def screen(self, msg: Message, expected: Expected) -> ClientUpload | str:
        """Accept a reply, or say why it is rejected."""
        if msg.has_error():
            return "client-error"
        content = msg.content
        if set(content.keys()) == {DECLINE_KEY} and DECLINE_KEY in content.config_records:
            reason = str(content.config_records[DECLINE_KEY].get("reason", "unknown"))
            return "declined:" + (reason if reason.replace("-", "").isalnum() else "unknown")[:40]
        if UPDATE_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
            return "malformed"
        expected_arrays = {UPDATE_KEY, BUFFERS_KEY} if expected.buffers else {UPDATE_KEY}
        if (set(content.array_records) != expected_arrays
                or set(content.metric_records) != {METRICS_KEY} or content.config_records):
            return "unexpected-record"
        try:
            update = decode(content.array_records[UPDATE_KEY], expected.release, self.device)
            buffers = (decode(content.array_records[BUFFERS_KEY], expected.buffers, self.device)
                       if expected.buffers else {})
        except RejectedReply as err:
            return err.reason
        metrics = content.metric_records[METRICS_KEY]
        num_examples = metrics.get("num-examples")
        if not isinstance(num_examples, int) or num_examples <= 0:
            return "bad-metrics"
        norm = flat_norm(update)
        if self.privacy is not None and (
                (reason := self.privacy.screen(norm, expected.released_dim,
                                               expected.cohort.expected)) is not None
                or (reason := self.privacy.screen_shape(update, expected.cohort.expected,
                                                        expected.support)) is not None):
            return reason
        loss, pre_clip, clipped, error, state_rounds, record_epsilon = (metrics.get(k) for k in (
            "train-loss", "update-norm", "clipped", "clip-error", "state-rounds",
            "record-epsilon"))
        if self.config.record_dp == "on" and record_epsilon is not None and not (
                isinstance(record_epsilon, int | float) and record_epsilon >= 0):
            return "bad-metrics"  # a silo that says what it has spent says a number
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
            record_report={k: float(v) for k in RECORD_REPORT
                           if isinstance(v := metrics.get(k), int | float)},
        )

    def accept(self, replies: Iterable[Message], expected: Expected,
               order: Callable[[int], int]) -> tuple[list[ClientUpload], RoundStats]:
        """Screen every reply; count and log the rejected ones (one upload per node at most,
        and only from nodes this round sampled). Uploads come sorted by ``order`` (the node's
        partition), so floating-point sums repeat exactly, run after run. Outliers are still in:
        ``drop_outliers`` comes after what must see every accepted reply (a silo's report)."""
        cohort = expected.cohort
        stats = RoundStats(sampled=len(cohort.nodes))
        uploads: list[ClientUpload] = []
        seen: set[int] = set()
        sampled = set(cohort.nodes)
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if not msg.has_error():
                stats.bytes_received += array_bytes(msg.content)
                if node_id in sampled and node_id not in seen:
                    stats.handed.append(node_id)
                metrics = msg.content.metric_records.get(METRICS_KEY)
                if metrics is not None and metrics.get("test-seeded"):
                    stats.test_seeded_nodes += 1
            if node_id in seen:
                verdict: ClientUpload | str = "duplicate"
            elif node_id not in sampled:
                verdict = "not-sampled"
            else:
                verdict = self.screen(msg, expected)
            seen.add(node_id)
            if isinstance(verdict, ClientUpload):
                uploads.append(verdict)
            elif verdict.startswith("declined:"):
                stats.declined[verdict.removeprefix("declined:")] += 1
                if verdict == "declined:record-budget":
                    stats.out_of_record_budget.append(node_id)
            elif verdict == "client-error":
                stats.failed += 1
                log(WARNING, "node %d failed: %s", node_id, short_reason(msg.error.reason))
            else:
                stats.rejected[verdict] += 1
                log(WARNING, "rejected the reply of node %d: %s", node_id, verdict)
        stats.missing = len(sampled - seen)
        uploads.sort(key=lambda upload: order(upload.node_id))
        self.count(uploads, stats)
        return uploads, stats

    @staticmethod
    def count(uploads: list[ClientUpload], stats: RoundStats) -> None:
        """The stats of the uploads that go into the aggregate."""
        stats.accepted = len(uploads)
        stats.norms = [u.update_norm for u in uploads if u.update_norm is not None]

    def drop_outliers(self, uploads: list[ClientUpload], stats: RoundStats
                      ) -> list[ClientUpload]:
        """Without DP, drop updates longer than norm-outlier-factor x the round's median (the
        stats count what is left)."""
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
        self.count(kept, stats)
        return kept
