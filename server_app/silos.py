"""The silos' own data, seen from the server: the schema every silo must share, agreed before
round 1, and the federated evaluation of the global model on the silos' held-out records.

The server never holds the data. What it learns is the schema fingerprint each node sends with
its answer to the partition query (column names and types, label set, input shape, held-out
count; the training count only where no client-level DP hides it) and, when it asks, each silo's
evaluation sums. Both are listed in summary.json ``privacy.outside_epsilon``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from plateau.config import ConfigError, RunConfig
from plateau.messages import (
    CONFIG_KEY,
    DECLINE_KEY,
    EVALUATION_KEY,
    MODEL_KEY,
    exchange,
    short_reason,
    tensors_record,
)
from plateau.silo_data import (
    TEXT,
    Schema,
    SiloDataError,
    disagreement,
    local_spec,
    resolve_classes,
)
from strategies.population import ClientPopulation

# what dataset='local' publishes beyond the model: listed in privacy.outside_epsilon (the label
# sets only without DP; the held-out counts only where the training count is public, or the
# held-out records are a file of their own, or the silo's operator allowed it)
LOCAL_OUTSIDE_EPSILON = {  # any run on the silos' own files
    "summary.json": ["config.num-classes, where make run read it from a simulation's files",
                     "silo_schemas (column names and types, input shape, file format; label "
                     "sets only without DP; held-out counts where published; training counts "
                     "only where num-examples carries them anyway)"],
}
FEDERATED_OUTSIDE_EPSILON = {  # the silos' evaluations (evaluate 'federated', 'both', 'auto')
    "rounds.jsonl": ["federated_accuracy", "federated_loss", "federated_examples",
                     "federated_silos", "federated_declined", "federated_rejected",
                     "test_accuracy and test_loss when evaluate='federated' (the silos' "
                     "held-out records are not trained on, so no epsilon covers them)"],
    "prometheus": ["plateau_federated_accuracy", "plateau_silo_accuracy"],
    "summary.json": ["federated (the last federated evaluation, per silo)",
                     "model.selection and the model itself, where keep-best='federated' chose "
                     "the round"],
}
MAX_INFERRED_CLASSES = 10_000  # more, from the silos' labels alone, must be declared
IMAGE_ONLY_MODELS = ("cnn", "resnet10", "resnet18", "vit", "tiny-vit")


def agree_on_schema(config: RunConfig, answers: Mapping[int, Mapping[str, Any]], *,
                    own_files: bool = False) -> tuple[RunConfig, dict[int, Schema]]:
    """The run config with the input shape and class count every usable silo's schema gives,
    and those schemas; one line naming the silo and the difference when they disagree.

    A silo whose data cannot be used (its answer carries the reason) is left out and declines
    its rounds; a run where none is left stops here, before anything trains. ``own_files``: the
    schemas were read from the files by the user's own launcher (a simulation), not sent by
    silos, which under DP keep their label sets.
    """
    usable: dict[int, Schema] = {}
    unusable: dict[int, str] = {}
    for partition, answer in sorted(answers.items()):
        if "error" in answer:
            unusable[partition] = str(answer["error"])
            continue
        try:
            usable[partition] = Schema.from_record(answer)
        except (ValueError, TypeError, KeyError) as err:
            unusable[partition] = f"a malformed schema ({err})"
    for partition, reason in unusable.items():
        log(WARNING, "silo %d cannot take part: %s", partition, reason)
    if not usable:
        reasons = "; ".join(f"silo {p}: {r}" for p, r in unusable.items()) or "no silo answered"
        raise ConfigError(f"dataset='local': no silo has usable data ({reasons[:600]})")
    spec = local_spec(config)
    if ((config.dp_enabled or config.record_dp == "on") and not own_files
            and not config.num_classes and not config.label_names):
        raise ConfigError("dataset='local' under DP: declare num-classes (or label-names); a "
                          "silo's label set does not leave it (a rare label would reveal its "
                          "record); make run fills it in from a simulation's files")
    try:
        classes = resolve_classes(usable, spec)
    except (SiloDataError, ValueError) as err:
        raise ConfigError(f"dataset='local': {err}") from None
    if classes > MAX_INFERRED_CLASSES and not (config.num_classes or config.label_names):
        raise ConfigError(f"dataset='local': the silos' labels imply {classes} classes; declare "
                          "num-classes (or label-names) if that is meant")
    if (line := disagreement(usable, classes, spec.label_names)) is not None:
        raise ConfigError(f"the silos' data disagree: {line}")
    first = next(iter(usable.values()))
    shape = "x".join(str(d) for d in first.input_shape)
    if first.kind != TEXT and config.input_shape and config.input_shape != shape:
        raise ConfigError(f"input-shape={config.input_shape!r}, but the silos' data give {shape}")
    if first.kind == "tabular" and config.model in IMAGE_ONLY_MODELS:
        raise ConfigError(f"model={config.model!r} reads images; the silos hold tabular data: "
                          "allowed: 'linear', 'mlp', or your own 'package.module:function'")
    if first.kind == TEXT and not config.text_column:
        raise ConfigError("the silos hold text: set text-column")
    if first.kind != TEXT and config.text_column:
        raise ConfigError(f"text-column={config.text_column!r}, but the silos hold "
                          f"{first.kind} data")
    log(INFO, "silos %s agree on their schema: %s data, input %s, %d classes%s",
        ", ".join(map(str, usable)), first.kind, shape or "tokens", classes,
        f" (left out: {', '.join(map(str, unusable))})" if unusable else "")
    resolved = dataclasses.replace(config, input_shape="" if first.kind == TEXT else shape,
                                   num_classes=classes)
    return resolved, usable


def check_data_dir(config: RunConfig, clients: int) -> RunConfig:
    """A simulation's silos, read up front where the launcher can see them all: data-dir holds
    one file or folder per client, and the silos agree on a schema (the ServerApp asks the
    nodes again; a silo whose data cannot be used only declines, as it would deployed)."""
    from plateau.silo_data import load_silo, silo_path

    if not config.data_dir:
        raise ConfigError("dataset='local' in a simulation needs data-dir=<folder> holding "
                          f"silo-0 ... silo-{clients - 1} (.parquet, .csv, .jsonl, or a "
                          "folder); deployed, each SuperNode names its own with node config "
                          "data=<path>")
    spec = local_spec(config)
    answers: dict[int, dict[str, Any]] = {}
    for partition in range(clients):
        try:
            schema = load_silo(silo_path(config.data_dir, partition), spec).schema
            answers[partition] = schema.to_record(with_counts=True)
        except SiloDataError as err:
            answers[partition] = {"error": str(err)}
    resolved, schemas = agree_on_schema(config, answers, own_files=True)
    if resolved.central_evaluation:  # the server's own file, before Flower starts
        from .evaluation import server_test_tensors

        server_test_tensors(resolved, next(iter(schemas.values())))
    return resolved


@dataclass
class FederatedResult:
    """One federated evaluation: sums over the silos whose replies passed screening."""

    examples: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    per_silo: dict[str, dict[str, float | int]] = field(default_factory=dict)
    declined: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.examples if self.examples else None

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.examples if self.examples else None


def screen_evaluation(reply: Message, declared: int | None) -> tuple[int, int, float] | str:
    """A silo's evaluation sums, or why they are refused: a silo may not report more examples
    than the held-out records it declared, more correct answers than examples, or a loss that
    is negative or not finite."""
    metrics = reply.content.metric_records.get(EVALUATION_KEY)
    if metrics is None:
        return f"malformed reply (records {sorted(reply.content.keys())})"
    examples, correct, loss = (metrics.get("examples"), metrics.get("correct"),
                               metrics.get("loss-sum"))
    if not (isinstance(examples, int) and isinstance(correct, int)
            and isinstance(loss, int | float)):
        return "malformed sums"
    if examples < 1:
        return f"examples={examples}"
    if declared is not None and examples > declared:
        return f"{examples} examples, more than the {declared} held-out records it declared"
    if not 0 <= correct <= examples:
        return f"correct={correct} outside 0..examples (accuracy outside [0, 1])"
    if not math.isfinite(loss) or loss < 0:
        return f"loss sum {loss!r} is negative or not finite"
    return examples, correct, float(loss)


class FederatedEvaluator:
    """Asks every identified silo to evaluate a model on its own held-out records."""

    def __init__(self, config: RunConfig, clients: ClientPopulation, grid: Grid,
                 schemas: Mapping[int, Schema]) -> None:
        self.config, self.clients, self.grid = config, clients, grid
        self.declared = {p: s.eval_records for p, s in schemas.items()}

    def due(self, server_round: int) -> bool:
        """Every evaluate-every rounds, and always after the last."""
        return (server_round % self.config.evaluate_every == 0
                or server_round == self.config.num_server_rounds)

    def __call__(self, state: Mapping[str, Any], server_round: int) -> FederatedResult:
        slots = self.clients.slots(self.grid)
        config = ConfigRecord({**self.config.to_dict(), "server-round": server_round})
        messages = [Message(content=RecordDict({MODEL_KEY: tensors_record(state),
                                                CONFIG_KEY: config}),
                            message_type=MessageType.EVALUATE, dst_node_id=node)
                    for node in slots.values()]
        partition_of = {node: partition for partition, node in slots.items()}
        result = FederatedResult()
        replies = exchange(self.grid, messages, self.config.round_timeout,
                           self.config.reply_poll_interval)
        for reply in sorted(replies, key=lambda r: partition_of.get(r.metadata.src_node_id, -1)):
            partition = partition_of.get(reply.metadata.src_node_id)
            if partition is None:
                continue
            if reply.has_error():
                result.rejected[str(partition)] = f"error: {short_reason(reply.error.reason)}"
                continue
            if (decline := reply.content.config_records.get(DECLINE_KEY)) is not None:
                reason = str(decline.get("reason", "declined"))
                result.declined[reason] = result.declined.get(reason, 0) + 1
                continue
            if partition not in self.declared:  # joined after the schemas were agreed
                result.rejected[str(partition)] = "no agreed schema (joined later)"
                continue
            screened = screen_evaluation(reply, self.declared[partition])
            if isinstance(screened, str):
                log(WARNING, "silo %d's evaluation refused: %s", partition, screened)
                result.rejected[str(partition)] = screened
                continue
            examples, correct, loss = screened
            result.examples += examples
            result.correct += correct
            result.loss_sum += loss
            result.per_silo[str(partition)] = {"accuracy": correct / examples,
                                               "loss": loss / examples, "examples": examples}
        missing = len(slots) - len(replies)
        if missing > 0:
            result.declined["no-reply"] = missing
        return result
