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
from .privacy_plan import PrivacyLedger, plan_privacy
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
    record["mean_state_rounds"] = metrics.get("mean-state-rounds")
    record["population"] = metrics.get("population")
    record["expected_cohort"] = metrics.get("expected-cohort")
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
    population = strategy.determine_population(grid)
    config, ledger = plan_privacy(config, population)
    strategy.config, strategy.privacy = config, mechanism_from_config(config)
    recorder = RunRecorder(config)
    strategy.summary()
    log(INFO, "results: %s", recorder.directory.resolve())
    initial = evaluator(strategy.current)
    log(INFO, "[round 0/%d] test accuracy %.4f, loss %.4f", config.num_server_rounds,
        initial.accuracy, initial.loss)

    arrays = ArrayRecord({k: v.cpu() for k, v in strategy.current.items()})
    status, outcome = "failed", {}
    try:
        for server_round in range(1, config.num_server_rounds + 1):
            if ledger is not None:
                fits, after = ledger.next_round_fits()
                if not fits:
                    status = "stopped"
                    outcome["stop_reason"] = (
                        f"privacy budget: round {server_round} would take epsilon from "
                        f"{ledger.epsilon:.4f} to {after:.4f} > max-epsilon={config.max_epsilon:g}")
                    log(WARNING, "stopping: %s", outcome["stop_reason"])
                    break
            started = time.monotonic()
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
            new_arrays, metrics = strategy.aggregate_train(server_round, replies)
            epsilon = ledger.commit_round() if ledger is not None else None
            stats = strategy.last_stats
            if stats.sampled and stats.accepted == 0 and stats.failed == stats.sampled:
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
            record["epsilon"] = epsilon
            recorder.record_round(record)
            _log_round(config, record, stats.sampled, flatness)
        else:
            status = "completed"
    except Exception as err:
        outcome["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        if ledger is not None:
            outcome |= {"epsilon": ledger.epsilon, "delta": ledger.delta}
        summary = recorder.write_summary(status, privacy=privacy_statement(config, ledger),
                                         **outcome)
    log(INFO, "finished (%s): final accuracy %s, best %s (round %s)%s, %.1f s", status,
        _fmt(summary["final_accuracy"]), _fmt(summary["best_accuracy"]), summary["best_round"],
        f", epsilon {ledger.epsilon:.4f} at delta {ledger.delta:g}" if ledger else "",
        summary["total_time_s"])
    return summary


def _log_round(config: RunConfig, record: dict[str, Any], sampled: int,
               flatness: Flatness | None) -> None:
    """The console's one line per round (plus the flatness line when measured)."""
    clipping = (f" | clipped {_fmt(record['clip_fraction'])}, clip error "
                f"{_fmt(record['mean_clip_error'])}" if config.dp_enabled else "")
    epsilon = "" if record["epsilon"] is None else f" | epsilon {record['epsilon']:.4f}"
    log(INFO, "[round %d/%d] test accuracy %.4f, loss %.4f | train loss %s | clients %d/%d | "
        "update norm %s, global %s%s%s | %.2f s", record["round"], config.num_server_rounds,
        record["test_accuracy"], record["test_loss"], _fmt(record["train_loss"]),
        record["num_clients"], sampled, _fmt(record["mean_update_norm"]),
        _fmt(record["global_update_norm"]), clipping, epsilon, record["wall_s"])
    if flatness is not None:
        log(INFO, "[round %d] sharpness %.5f, top Hessian eigenvalue %.4f", record["round"],
            flatness.sharpness, flatness.hessian_top_eigenvalue)


def privacy_statement(config: RunConfig, ledger: PrivacyLedger | None) -> dict[str, Any]:
    """What the run's privacy claim is, in summary.json."""
    mechanism = mechanism_from_config(config)
    if mechanism is None:
        return {"dp": "off", "formally_dp": False}
    statement: dict[str, Any] = {
        "dp": config.dp,
        "clip_mode": config.dp_clip_mode,
        "formally_dp": ledger is not None,
        "clip_norm": config.clip_norm,
        "noise_multiplier": config.noise_multiplier,
        "sampling": config.sampling_method,
    }
    if ledger is None:
        statement["note"] = ("the authors' per-tensor median clip is not differentially private"
                             if not mechanism.formally_dp else
                             "BatchNorm statistics were released without protection")
        return statement
    return statement | {
        "accountant": config.accountant,
        "population": ledger.population,
        "sample_rate": config.sample_rate,
        "expected_cohort": ledger.expected_cohort,
        "delta": ledger.delta,
        "epsilon": ledger.epsilon,
        "adjacency": "add/remove one client" if config.sampling_method == "poisson"
        else "replace one client",
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
