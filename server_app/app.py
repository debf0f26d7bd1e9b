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
from plateau.privacy import mechanism_from_config
from strategies import STRATEGIES, PlateauStrategy

from .evaluation import CentralEvaluator
from .flatness import Flatness, FlatnessProbe
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
    privacy = mechanism_from_config(config)
    if privacy is not None and config.noise_multiplier == 0:
        log(WARNING, "dp=%r with noise-multiplier=0: updates are clipped but not noised, so "
            "there is no privacy guarantee (epsilon is infinite)", config.dp)
    if privacy is not None and not privacy.formally_dp:
        log(WARNING, "dp-clip-mode=%r is the authors' privatiser (per-tensor clip at each "
            "client's median norm): it is NOT differentially private and no epsilon is "
            "reported", config.dp_clip_mode)
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
                  lr: float, wall_s: float, dp: bool, flatness: Flatness | None
                  ) -> dict[str, Any]:
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
        "mean_update_norm": metrics.get("mean-update-norm"),
    }
    if dp:
        record["clip_fraction"] = metrics.get("clip-fraction")
        record["mean_clip_error"] = metrics.get("mean-clip-error")
        record["effective_noise_multiplier"] = metrics.get("effective-noise-multiplier")
    record["sharpness"] = flatness.sharpness if flatness else None
    record["hessian_top_eigenvalue"] = flatness.hessian_top_eigenvalue if flatness else None
    record["epsilon"] = None
    record["wall_s"] = round(wall_s, 4)
    return record


def run(grid: Grid, raw_config: Mapping[str, ConfigValue]) -> dict[str, Any]:
    """Train for ``num-server-rounds`` rounds; returns the summary written to summary.json."""
    try:
        config = load_config(raw_config)
        strategy = build_strategy(config)
        evaluator = CentralEvaluator(config, strategy.device)
        probe = FlatnessProbe(config, strategy.device) if config.sharpness_every else None
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
            wall_s = time.monotonic() - started
            flatness = (probe(strategy.current, server_round)
                        if probe is not None and probe.due(server_round) else None)
            record = _round_record(
                server_round, metrics or {}, result.accuracy, result.loss,
                strategy.learning_rate(server_round), wall_s, config.dp_enabled, flatness,
            )
            recorder.record_round(record)
            clipping = (f" | clipped {_fmt(record['clip_fraction'])}, clip error "
                        f"{_fmt(record['mean_clip_error'])}" if config.dp_enabled else "")
            log(INFO, "[round %d/%d] test accuracy %.4f, loss %.4f | train loss %s | clients "
                "%d/%d | update norm %s, global %s%s | %.2f s", server_round,
                config.num_server_rounds, result.accuracy, result.loss,
                _fmt(record["train_loss"]), record["num_clients"], stats.sampled,
                _fmt(record["mean_update_norm"]), _fmt(record["global_update_norm"]), clipping,
                record["wall_s"])
            if flatness is not None:
                log(INFO, "[round %d] sharpness %.5f, top Hessian eigenvalue %.4f", server_round,
                    flatness.sharpness, flatness.hessian_top_eigenvalue)
        status = "completed"
    except Exception as err:
        failure = f"{type(err).__name__}: {err}"
        raise
    finally:
        summary = recorder.write_summary(
            status, privacy=privacy_statement(config), **({"error": failure} if failure else {}))
    log(INFO, "finished: final accuracy %.4f, best %.4f (round %s), %.1f s",
        summary["final_accuracy"], summary["best_accuracy"], summary["best_round"],
        summary["total_time_s"])
    return summary


def privacy_statement(config: RunConfig) -> dict[str, Any]:
    """What the run's privacy claim is, in summary.json."""
    mechanism = mechanism_from_config(config)
    if mechanism is None:
        return {"dp": "off", "formally_dp": False}
    return {
        "dp": config.dp,
        "clip_mode": config.dp_clip_mode,
        "formally_dp": mechanism.formally_dp and config.norm != "batch",
        "clip_norm": config.clip_norm,
        "noise_multiplier": config.noise_multiplier,
        "target_delta": config.target_delta,
        "epsilon": None,
        "note": ("the authors' per-tensor median clip is not differentially private"
                 if not mechanism.formally_dp
                 else "BatchNorm statistics were released without protection"
                 if config.norm == "batch" else "epsilon accounting is not implemented yet"),
    }


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
