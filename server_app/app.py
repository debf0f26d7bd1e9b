"""The ServerApp: build everything from the validated config, run the rounds, record them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import ERROR, INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from plateau.config import ConfigError, ConfigValue, RunConfig
from plateau.data import DATASETS, DataError
from plateau.device import resolve_device
from plateau.models import build_model, float_buffer_names
from plateau.privacy import GaussianClientDP
from strategies import STRATEGIES, PlateauStrategy

from .evaluation import CentralEvaluator
from .results import RunRecorder


class RunFailed(RuntimeError):
    """A run that cannot go on (every client of a round failed)."""


def load_config(raw: Mapping[str, ConfigValue]) -> RunConfig:
    """Validate the run config, including the keys only the server can check."""
    config = RunConfig.from_mapping(raw)
    if config.algorithm not in STRATEGIES:
        raise ConfigError(
            f"algorithm={config.algorithm!r} is not allowed; expected one of "
            + ", ".join(repr(name) for name in STRATEGIES)
        )
    classes = DATASETS[config.dataset].num_classes
    if config.partitioner == "pathological" and config.classes_per_client > classes:
        raise ConfigError(
            f"classes-per-client={config.classes_per_client} is not allowed for "
            f"dataset={config.dataset!r}; expected <= {classes}"
        )
    return config


def build_strategy(config: RunConfig) -> PlateauStrategy:
    """The configured algorithm, wired to the privacy mechanism and the device."""
    device = resolve_device(config.device)
    model = build_model(config.model, DATASETS[config.dataset], norm=config.norm,
                        width=config.model_width, seed=config.seed)
    buffers = float_buffer_names(model)
    if config.dp_enabled and buffers:
        log(WARNING, "dp-allow-batchnorm=true: %d BatchNorm buffers are averaged WITHOUT clipping "
            "or noise; no privacy guarantee covers them", len(buffers))
    privacy = (
        GaussianClientDP(config.clip_norm, config.noise_multiplier, placement=config.dp)
        if config.dp_enabled else None
    )
    strategy = STRATEGIES[config.algorithm](
        config,
        parameter_names=[n for n, p in model.named_parameters() if p.requires_grad],
        buffer_names=buffers,
        privacy=privacy,
        device=device,
    )
    strategy.current = {k: v.to(device) for k, v in model.state_dict().items()}
    return strategy


def _round_record(server_round: int, metrics: Mapping[str, Any], accuracy: float, loss: float,
                  lr: float, wall_s: float, dp: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "round": server_round,
        "test_accuracy": accuracy,
        "test_loss": loss,
        "train_loss": metrics.get("train-loss"),
        "num_clients": metrics.get("num-clients", 0),
        "num_sampled": metrics.get("num-sampled"),
        "num_failed": metrics.get("num-failed"),
        "num_rejected": metrics.get("num-rejected"),
        "lr": lr,
        "global_update_norm": metrics.get("global-update-norm"),
    }
    if dp:
        record["clip_fraction"] = metrics.get("clip-fraction")
        record["mean_update_norm"] = metrics.get("mean-update-norm")
        record["effective_noise_multiplier"] = metrics.get("effective-noise-multiplier")
    record["epsilon"] = None
    record["wall_s"] = round(wall_s, 4)
    return record


def run(grid: Grid, raw_config: Mapping[str, ConfigValue]) -> dict[str, Any]:
    """Train for ``num-server-rounds`` rounds; returns the summary written to summary.json."""
    try:
        config = load_config(raw_config)
        strategy = build_strategy(config)
        evaluator = CentralEvaluator(config, strategy.device)
    except (ConfigError, DataError, RuntimeError) as err:
        log(ERROR, "cannot start the run: %s", err)
        raise
    recorder = RunRecorder(config)
    strategy.summary()
    log(INFO, "results: %s", recorder.directory.resolve())
    initial = evaluator(strategy.current)
    log(INFO, "[round 0/%d] test accuracy %.4f, loss %.4f", config.num_server_rounds,
        initial.accuracy, initial.loss)

    arrays = ArrayRecord({k: v.cpu() for k, v in strategy.current.items()})
    status, failure = "failed", None
    try:
        for server_round in range(1, config.num_server_rounds + 1):
            started = time.monotonic()
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
            new_arrays, metrics = strategy.aggregate_train(server_round, replies)
            stats = strategy.last_stats
            if stats.accepted == 0 and stats.failed == stats.sampled:
                reasons = {r.error.reason for r in replies if r.has_error()}
                raise RunFailed(f"round {server_round}: every sampled client failed: "
                                + "; ".join(sorted(reasons))[:500])
            if new_arrays is not None:
                arrays = new_arrays
            result = evaluator(strategy.current)
            record = _round_record(
                server_round, metrics or {}, result.accuracy, result.loss,
                strategy.learning_rate(server_round), time.monotonic() - started,
                config.dp_enabled,
            )
            recorder.record_round(record)
            log(INFO, "[round %d/%d] test accuracy %.4f, loss %.4f | train loss %s | clients "
                "%d/%d%s | %.2f s", server_round, config.num_server_rounds, result.accuracy,
                result.loss, _fmt(record["train_loss"]), record["num_clients"], stats.sampled,
                f" | clipped {_fmt(record['clip_fraction'])}" if config.dp_enabled else "",
                record["wall_s"])
        status = "completed"
    except Exception as err:
        failure = f"{type(err).__name__}: {err}"
        raise
    finally:
        summary = recorder.write_summary(status, **({"error": failure} if failure else {}))
    log(INFO, "finished: final accuracy %.4f, best %.4f (round %s), %.1f s",
        summary["final_accuracy"], summary["best_accuracy"], summary["best_round"],
        summary["total_time_s"])
    return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def build_server_app(overrides: Mapping[str, ConfigValue] | None = None) -> ServerApp:
    """A ServerApp reading the run config, with optional overrides (used by in-process tests,
    where ``run_simulation`` leaves the run config empty)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, {**context.run_config, **(overrides or {})})

    return server_app


app = build_server_app()
