"""The ClientApp: K local steps from the global model, then release the clipped, noised update.

Flower starts this process afresh for every message on a real SuperNode, so importing it must
be cheap: it imports Flower (already loaded by ``flwr-clientapp``) and the config schema, never
torch. It checks what the node's operator demands (the partition, the privacy floors) and then
does the work, either itself (``client_app.compute``, imported on first use) or, when the node
config names a ``trainer-socket``, by handing it to the node's warm trainer
(``python -m node.trainer``), which keeps torch, the model and the data loaded.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from plateau import messages
from plateau.config import LOCAL_DATASET, RunConfig

from .handoff import hand_off, trainer_socket
from .policy import (
    NodeConfigError,
    allows_evaluation,
    enforce_node_policy,
    evaluation_published,
    partition_of,
)
from .wire import TrainerError

app = ClientApp()
# torch-side names that live in compute.py and are imported from there on first use
_COMPUTE_NAMES = frozenset({"STATE_ROUNDS", "local_round", "load_state", "public_mask",
                            "save_state"})


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds: it samples and sums by partition, not
    by the random node ids Flower assigns, so a seeded run repeats. When the question carries
    the run config of a run this node's policy admits, prepare for round 1 meanwhile (the model,
    this partition's tensors and torch's first backward pass, here or in the node's trainer):
    round 1 then costs what later rounds do."""
    pid, num = partition_of(context)
    question = msg.content.config_records.get(messages.CONFIG_KEY, ConfigRecord())
    schema: Mapping[str, object] | None = None
    if RunConfig.key_fields().keys() <= set(question):
        cfg = RunConfig.from_record(question, algorithm_keys=False)
        if _admitted(cfg, context.node_config):
            path = trainer_socket(context.node_config)
            if path is None:
                from . import compute

                schema = compute.prepare(cfg, context)
            else:
                content, state = hand_off(path, "query", RecordDict(
                    {messages.CONFIG_KEY: question}), context, cfg.round_timeout)
                schema = content.config_records.get(messages.SCHEMA_KEY)
                context.state.clear()
                context.state.update(state)
        elif cfg.dataset == LOCAL_DATASET:
            schema = {"error": "this SuperNode's policy refuses the run (node config)"}
    return Message(messages.identity(pid, num, schema), reply_to=msg)


def _admitted(cfg: RunConfig, node_config: Mapping[str, object]) -> bool:
    """Whether this node's policy lets it train for the run (the train message will say why
    not): no work, not even the warm-up, is handed to the trainer otherwise."""
    try:
        enforce_node_policy(cfg, node_config)
    except NodeConfigError:
        return False
    return True


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the local rule the server asked for and reply with the released update. The node
    policy is enforced here, in the process Flower started, before any work is done or handed
    to the node's trainer."""
    cfg = RunConfig.from_record(msg.content["config"], algorithm_keys=False)
    partition_of(context)
    enforce_node_policy(cfg, context.node_config)
    path = trainer_socket(context.node_config)
    if path is None:
        from . import compute

        return Message(content=compute.train(msg.content, context), reply_to=msg)
    content, state = hand_off(path, "train", msg.content, context, cfg.round_timeout)
    if not messages.is_reply_shape(content):
        raise TrainerError(f"malformed reply from the trainer at {path}: records "
                           f"{sorted(content.keys())}")
    context.state.clear()
    context.state.update(state)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on this silo's held-out records, unless the
    silo's operator turned it off (``allow-evaluation=false`` in the node config: what the
    evaluation publishes, sums over its held-out records, is outside epsilon) or its sums would
    tell its private record count (:func:`evaluation_published`)."""
    cfg = RunConfig.from_record(msg.content["config"], algorithm_keys=False)
    partition_of(context)
    if not allows_evaluation(context.node_config):
        return decline(msg, "evaluation-not-allowed")
    if not evaluation_published(cfg, context.node_config):
        return decline(msg, "count-private")
    enforce_node_policy(cfg, context.node_config)
    path = trainer_socket(context.node_config)
    if path is None:
        from . import compute

        return Message(content=compute.evaluate(msg.content, context), reply_to=msg)
    content, state = hand_off(path, "evaluate", msg.content, context, cfg.round_timeout)
    if set(content.keys()) not in ({messages.EVALUATION_KEY}, {messages.DECLINE_KEY}):
        raise TrainerError(f"malformed evaluation from the trainer at {path}: records "
                           f"{sorted(content.keys())}")
    context.state.clear()
    context.state.update(state)
    return Message(content=content, reply_to=msg)


def decline(msg: Message, reason: str) -> Message:
    """A reply that takes no part in the round (e.g. a partition without examples): counted by
    the server as declined, never as a malformed reply; under DP its noise share is topped up
    like a dropout's."""
    return Message(messages.decline(reason), reply_to=msg)


def __getattr__(name: str) -> object:
    """``local_round``, ``load_state``, ``save_state`` and ``STATE_ROUNDS`` live with torch in
    ``client_app.compute``; they are importable from here, but only import torch when asked."""
    if name in _COMPUTE_NAMES:
        from . import compute

        return getattr(compute, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
