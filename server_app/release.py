"""The model a run releases (``<run>/model/``, ``plateau.export``): which round, how it was
chosen, and the privacy it was released under, as summary.json states it."""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common import log

from plateau.config import RunConfig
from plateau.errors import DataError
from plateau.export import write_export

MODEL_FOLDER = "model"
# a silo's default record-level delta is min(this, 0.01 / its records): a bound above every
# default, stated instead of each silo's own delta
DEFAULT_RECORD_DELTA = 1e-5


def selection(config: RunConfig, server_round: int, value: float | None) -> dict[str, Any]:
    """How the exported round was chosen, and whether choosing it is post-processing of what
    the epsilon covers. The last round, or the best by central accuracy (the server's own data
    or a bundled test split: public to the run), is; the best by federated accuracy is not:
    that accuracy comes from the silos' private held-out records, which no epsilon covers."""
    keep = config.keep_best
    metric = {"last": None,
              "central": ("central accuracy on the server's test-data file"
                          if config.test_data else "central accuracy on the held-out split"),
              "federated": "federated accuracy on the silos' held-out records"}[keep]
    private = keep == "federated" and (config.dp_enabled or config.record_dp == "on")
    note = ("the selection used the silos' held-out records, which no epsilon covers: the "
            "released model is not covered by the run's epsilon as a whole" if private else
            "choosing this round uses nothing the epsilon does not cover")
    if keep == "central" and not config.test_data and not config.validation_fraction:
        note += ("; it was chosen on the test split its accuracy is measured on, so that "
                 "accuracy is optimistic (validation-fraction > 0 selects on a validation "
                 "split instead)")
    return {"keep_best": keep, "round": server_round, "metric": metric, "value": value,
            "post_processing": not private, "note": note}


def release_privacy(privacy: Mapping[str, Any], record_privacy: Mapping[str, Any] | None,
                    chosen: Mapping[str, Any]) -> dict[str, Any]:
    """model.json's "privacy": the client-level and record-level guarantees exactly as
    summary.json states them, each null with the reason where it does not hold."""
    void = privacy.get("epsilon_void_reason")
    client: dict[str, Any] | None = None
    reasons: dict[str, str] = {}
    if privacy.get("dp", "off") == "off":
        reasons["client_level"] = "dp='off': no client-level guarantee"
    elif privacy.get("epsilon") is None or not privacy.get("formally_dp"):
        reasons["client_level"] = (void or privacy.get("note")
                                   or "no formal client-level guarantee holds")
    else:
        client = {key: privacy.get(key) for key in (
            "dp", "epsilon", "delta", "adjacency", "accountant", "clip_norm",
            "noise_multiplier", "sampling", "sample_rate", "population", "epsilon_covers",
            "epsilon_against_server")}
    record: dict[str, Any] | None = None
    if record_privacy is None:
        reasons["record_level"] = "record-dp='off': no record-level guarantee"
    elif record_privacy.get("void"):
        reasons["record_level"] = str(record_privacy["void"])
    else:
        # each silo's epsilon and delta as the silos published them (no counts, steps or
        # budget status: telemetry for the operator, not for whoever receives the model)
        # each silo's epsilon as the silos published it, at one common delta bound (a silo's
        # default delta, min(1e-5, 0.01/n), would tell its count n); no counts, steps or
        # budget status: telemetry for the operator, not for whoever receives the model
        reports = record_privacy.get("silos") or {}
        record = {key: record_privacy.get(key) for key in ("unit", "adjacency", "epsilon_max")}
        record["delta_at_most"] = max([DEFAULT_RECORD_DELTA, *(
            float(r["delta"]) for r in reports.values() if r.get("delta") is not None)])
        record["silos"] = {partition: {"epsilon": report.get("epsilon"),
                                       "adjacency": report.get("adjacency")}
                           for partition, report in reports.items()}
        record["note"] = ("the figures each silo chose to publish (publish-record-epsilon, or "
                          "a run without client-level DP), each holding at delta_at_most; a "
                          "silo that publishes none is within its own budget and accountant")
    holds = (client is not None or record is not None) and bool(chosen["post_processing"])
    if (client is not None or record is not None) and not chosen["post_processing"]:
        reasons["selection"] = chosen["note"]
    return {"formally_dp": holds, "client_level": client, "record_level": record,
            "why_not": reasons or None, "outside_epsilon": privacy.get("outside_epsilon")}


def export_model(directory: Path, config: RunConfig, state: Mapping[str, torch.Tensor],
                 server_round: int, value: float | None, privacy: Mapping[str, Any],
                 record_privacy: Mapping[str, Any] | None,
                 feature_columns: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """Write ``<run>/model`` and return summary.json's "model"; None (logged) when it cannot
    be written: the run's results stand without it. ``feature_columns``: the tabular columns
    the silos agreed on."""
    chosen = selection(config, server_round, value)
    folder = directory / MODEL_FOLDER
    try:
        descriptor = write_export(folder, config, state, server_round=server_round,
                                  run_name=directory.name, selection=chosen,
                                  privacy=release_privacy(privacy, record_privacy, chosen),
                                  feature_columns=feature_columns)
    except (DataError, OSError, RuntimeError, ValueError) as err:
        log(WARNING, "the model could not be exported to %s: %s", folder, err)
        return None
    log(INFO, "model of round %d exported to %s (%s)", server_round, folder,
        "formally DP" if descriptor["privacy"]["formally_dp"] else "no formal guarantee")
    return {"folder": str(folder.resolve()), "round": server_round,
            "keep_best": config.keep_best, "selected_by": chosen["metric"],
            "value": value, "formally_dp": descriptor["privacy"]["formally_dp"]}
