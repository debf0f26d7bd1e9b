"""What the node's operator allows, read from its node config: the partition, the privacy
floors, whether the silo answers federated evaluation. Torch-free and Flower-light, so the
ClientApp process checks it before any work is done or handed to the node's trainer, and the
round's work (``client_app.compute``) reads the same rules without importing the ClientApp."""

from __future__ import annotations

import math
from collections.abc import Mapping

from flwr.app import Context

from plateau.config import RunConfig
from plateau.privacy.silo_policy import NodeConfigError, SiloPolicy

__all__ = ["PROTECTION", "NodeConfigError", "allows_evaluation", "count_public",
           "enforce_node_policy", "evaluation_published", "partition_of"]


def partition_of(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config (set per SuperNode)."""
    try:
        pid, num = int(context.node_config["partition-id"]), int(
            context.node_config["num-partitions"])
    except (KeyError, ValueError, TypeError):
        raise NodeConfigError(
            "this SuperNode has no valid partition: start it with "
            "--node-config 'partition-id=<i> num-partitions=<n>'"
        ) from None
    return pid, num


PROTECTION = {"off": 0, "central": 1, "distributed": 2, "local": 3}


def enforce_node_policy(config: RunConfig, node_config: Mapping[str, object]) -> None:
    """Refuse a round whose privacy is weaker than this SuperNode's operator allows.

    The run config (and so every round's message) comes from whoever submits the run. A node
    that does not trust the server sets floors in its own node config, e.g.
    ``--node-config "partition-id=0 num-partitions=10 require-dp='local' min-noise-multiplier=1.0
    max-clip-norm=1.0"``. A silo protecting its records sets the keys of
    :class:`plateau.privacy.silo_policy.SiloPolicy` (``require-record-dp``,
    ``min-record-noise-multiplier``, ``max-record-epsilon`` and ``max-record-delta`` with the
    ``record-ledger`` they need, ``record-public-size``); the budget is enforced where the
    ledger is, in ``client_app.compute``.
    """
    policy = SiloPolicy.from_node_config(node_config)
    required = str(node_config.get("require-dp", "off"))
    if required not in PROTECTION:
        raise NodeConfigError(f"require-dp={required!r}; expected one of {list(PROTECTION)}")
    if PROTECTION[config.dp] < PROTECTION[required]:
        raise NodeConfigError(f"this SuperNode requires dp={required!r} or stronger; the run "
                              f"asks for dp={config.dp!r}")
    floor = float(node_config.get("min-noise-multiplier", 0.0))
    if config.dp_enabled and config.noise_multiplier < floor:
        raise NodeConfigError(f"noise-multiplier={config.noise_multiplier} is below this "
                              f"SuperNode's min-noise-multiplier={floor}")
    ceiling = float(node_config.get("max-clip-norm", math.inf))
    if config.dp_enabled and config.clip_norm > ceiling:
        raise NodeConfigError(f"clip-norm={config.clip_norm} is above this SuperNode's "
                              f"max-clip-norm={ceiling}")
    if policy.requires_record_dp and config.record_dp != "on":
        raise NodeConfigError("this SuperNode requires record-level DP (require-record-dp, or "
                              "a record-level budget or noise floor); the run has "
                              "record-dp='off'")
    record_floor = policy.min_record_noise_multiplier
    if (config.record_dp == "on" and config.record_target_epsilon == 0
            and config.record_noise_multiplier < record_floor):
        raise NodeConfigError(f"record-noise-multiplier={config.record_noise_multiplier} is "
                              f"below this SuperNode's min-record-noise-multiplier={record_floor}")
    if required != "off" and config.dp_clip_mode != "flat":
        raise NodeConfigError("dp-clip-mode='code' is not differentially private; this "
                              "SuperNode requires a formal guarantee")


def allows_evaluation(node_config: Mapping[str, object]) -> bool:
    """The node config's ``allow-evaluation`` (default true)."""
    value = node_config.get("allow-evaluation", True)
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise NodeConfigError(f"allow-evaluation={value!r}; expected true or false")
        return value.lower() == "true"
    return bool(value)


def count_public(cfg: RunConfig, node_config: Mapping[str, object]) -> bool:
    """Whether this silo's record count leaves it anyway: a run without client-level DP, for a
    silo without ``record-public-size`` (its replies carry the count as num-examples)."""
    return not cfg.dp_enabled and not SiloPolicy.from_node_config(node_config).record_public_size


def evaluation_published(cfg: RunConfig, node_config: Mapping[str, object]) -> bool:
    """Whether this silo answers federated evaluation. Its sums carry its held-out count, a
    share (eval-fraction) of its record count unless its held-out records are a file of their
    own (``eval-data``): where that count is private, the silo evaluates only with such a file
    or when its operator says so explicitly (``allow-evaluation=true``)."""
    if not allows_evaluation(node_config):
        return False
    return (count_public(cfg, node_config) or bool(node_config.get("eval-data"))
            or "allow-evaluation" in node_config)
