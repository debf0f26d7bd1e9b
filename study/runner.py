"""Run a study: tune every arm with the same budget, then run the chosen values for every point
of the grid and every seed. Each cell is an in-process simulation (``study.grid``) whose
result is stored as ``cells/<id>.json`` next to its run folder; a cell whose file exists is
never rerun, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from plateau.config import ConfigError, RunConfig

from .spec import Arm, Study

# privacy keys that decide the calibrated sigma (with the number of clients)
CALIBRATION_KEYS = ("dp", "sample-rate", "num-server-rounds", "target-delta", "accountant",
                    "sampling", "target-epsilon")
SCORE_LAST_ROUNDS = 3  # a trial's score: mean validation accuracy of its last rounds


@dataclass(frozen=True)
class Cell:
    """One simulation: which arm, where in the grid, which seed, and its whole config."""

    kind: str  # 'tune' or 'final'
    arm: str
    point: dict[str, Any]
    seed: int
    clients: int
    config: dict[str, Any]
    tuned: dict[str, Any]

    @property
    def id(self) -> str:
        """Content address: the same config and clients is the same cell, in any study."""
        blob = json.dumps({"config": self.config, "clients": self.clients}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "arm": self.arm, "point": self.point,
                "seed": self.seed, "clients": self.clients, "config": self.config,
                "tuned": self.tuned}


class Calibrator:
    """sigma for a target epsilon, computed once per (epsilon, q, T, delta, N, placement) with
    the ServerApp's own calibration and kept in ``calibration.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.table: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def sigma(self, config: Mapping[str, Any], clients: int) -> float:
        from plateau.privacy.accounting import calibrate_noise, default_delta
        from server_app.privacy_plan import event_for

        cfg = RunConfig.from_mapping({**config, "dp-clip-mode": "flat"})
        key = json.dumps([clients, *(cfg.to_dict()[k] for k in CALIBRATION_KEYS)])
        if key not in self.table:
            delta = cfg.target_delta or default_delta(clients)
            self.table[key] = calibrate_noise(
                lambda s: event_for(cfg, clients, s), cfg.num_server_rounds,
                cfg.target_epsilon, delta, cfg.accountant, cfg.sampling_method)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.table, indent=1))
        return self.table[key]


def equal_epsilon(config: dict[str, Any], clients: int, calibrator: Calibrator
                  ) -> dict[str, Any]:
    """Replace ``target-epsilon`` by the calibrated sigma (the same for every arm at the same
    q, T, delta) and keep the epsilon as the run's cap, so a run could never overspend even if
    the table were wrong. Non-DP arms drop the key; the authors' code-mode clip (no epsilon)
    gets the same nominal sigma as the flat clip."""
    epsilon = float(config.get("target-epsilon", 0.0))
    if epsilon <= 0:
        return config
    config = {k: v for k, v in config.items() if k != "target-epsilon"}
    if config.get("dp", "off") == "off":
        return config
    config["noise-multiplier"] = round(calibrator.sigma({**config, "target-epsilon": epsilon},
                                                        clients), 6)
    if config.get("dp-clip-mode", "flat") == "flat":
        config["max-epsilon"] = epsilon
    return config


def tuning_cells(study: Study, calibrator: Calibrator) -> list[Cell]:
    """Every arm's trials at the tuning point, on the validation split."""
    point = study.tuning_point()
    cells = []
    for arm in study.arms:
        for trial in arm.trials(study.tuning.budget, study.name):
            if not trial:
                continue
            config = {**study.base, **point, **arm.config, **trial,
                      "seed": study.tuning.seed,
                      "validation-fraction": study.tuning.validation_fraction}
            if study.tuning.rounds:
                config["num-server-rounds"] = study.tuning.rounds
            cells.append(Cell("tune", arm.name, point, study.tuning.seed, study.clients,
                              equal_epsilon(config, study.clients, calibrator), trial))
    return cells


def trial_score(result: Mapping[str, Any]) -> float:
    """Mean held-out accuracy of the last rounds (less noisy than the final round alone)."""
    accuracies = [r["test_accuracy"] for r in result["rounds"]][-SCORE_LAST_ROUNDS:]
    return statistics.fmean(accuracies) if accuracies else float("nan")


def chosen_values(arm: Arm, trials: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The arm's best trial among ``trials`` (this study's finished trials, in the drawn order;
    ties: the first); {} when it has none. Only this draw counts: a folder may also hold trials
    of an earlier draw, which would give the arm more than its budget."""
    mine = [t for t in trials if t["kind"] == "tune" and t["arm"] == arm.name]
    if not mine:
        return {}
    return dict(max(mine, key=trial_score)["tuned"])


def final_cells(study: Study, calibrator: Calibrator,
                results: Mapping[str, dict[str, Any]]) -> list[Cell]:
    """Every arm with its chosen values at every point and seed, on the test split."""
    trials = [results[c.id] for c in tuning_cells(study, calibrator) if c.id in results]
    tuned = {arm.name: chosen_values(arm, trials) for arm in study.arms}
    cells = []
    for seed in study.seeds:  # seed by seed: a study stopped early still covers every arm
        for point in study.points():
            for arm in study.arms:
                config = {**study.base, **point, **arm.config, **tuned[arm.name], "seed": seed}
                cells.append(Cell("final", arm.name, point, seed, study.clients,
                                  equal_epsilon(config, study.clients, calibrator),
                                  tuned[arm.name]))
    return cells


def run_cell(cell: dict[str, Any], out: Path, threads: int) -> dict[str, Any]:
    """Worker: run one cell and store its result (atomically: a killed worker leaves none).
    A cell that fails returns its error instead; the study goes on and reports it."""
    import torch

    from .grid import run_local

    torch.set_num_threads(threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_folder = out / "runs" / cell["id"]
    shutil.rmtree(run_folder, ignore_errors=True)  # what a stopped attempt left
    try:
        output = run_local(cell["config"], cell["clients"], run_folder)
    except Exception as err:  # noqa: BLE001 - one failed cell must not lose the others
        return {**cell, "error": f"{type(err).__name__}: {err}"}
    keep = ("status", "final_accuracy", "best_accuracy", "best_round", "epsilon", "delta",
            "rounds_completed", "privacy")
    result = {**cell, "summary": {k: output.summary.get(k) for k in keep},
              "rounds": output.rounds, "wall_s": round(output.wall_s, 3),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = out / "cells" / f"{cell['id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    partial.write_text(json.dumps(result))
    partial.replace(path)
    return result


def load_results(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished cell of the study folder, by id."""
    folder = out / "cells"
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def execute(cells: Iterable[Cell], out: Path, jobs: int,
            say: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run the cells not yet finished, ``jobs`` at a time (each with its share of the CPUs)."""
    done = load_results(out)
    cells = list(cells)
    pending = [c.as_dict() for c in cells if c.id not in done]
    unique = list({c["id"]: c for c in pending}.values())
    if not unique:
        return done
    threads = max(1, (os.cpu_count() or 1) // jobs)
    finished = len({c.id for c in cells} - {c["id"] for c in unique})
    say(f"{len(unique)} cells to run ({finished} already finished), {jobs} at a time")
    started = time.monotonic()
    failed = []

    def collect(index: int, result: dict[str, Any]) -> None:
        if "error" in result:
            failed.append(result)
        else:
            done[result["id"]] = result
        say(_progress(index, len(unique), result, started))

    if jobs == 1:
        for index, cell in enumerate(unique, 1):
            collect(index, run_cell(cell, out, threads))
    else:
        pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                                   initializer=_worker_init)
        try:
            futures = [pool.submit(run_cell, cell, out, threads) for cell in unique]
            for index, future in enumerate(as_completed(futures), 1):
                collect(index, future.result())
        finally:  # also on a stop signal: no worker outlives the study (finished cells stay)
            workers = list((pool._processes or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.join()
    if failed:
        raise StudyError(f"{len(failed)} cell(s) failed: " + "; ".join(
            f"{r['id']} ({r['arm']}, seed {r['seed']}): {r['error']}" for r in failed))
    return done


def _worker_init() -> None:
    """A worker leaves stopping to the study process (Ctrl-C reaches the whole process group)
    and dies with it if it is killed outright."""
    from server_app.launcher import die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()


class StudyError(RuntimeError):
    """Cells that failed; the finished ones are kept and a rerun retries only the others."""


def _progress(index: int, total: int, result: Mapping[str, Any], started: float) -> str:
    point = " ".join(f"{k}={v}" for k, v in result["point"].items())
    head = (f"[{index}/{total} {time.monotonic() - started:.0f} s] {result['kind']} "
            f"{result['arm']} {point} seed={result['seed']}")
    if "error" in result:
        return f"{head}: FAILED {result['error']} ({result['id']})"
    return (f"{head}: accuracy {result['summary']['final_accuracy']:.4f} in "
            f"{result['wall_s']:.0f} s ({result['id']})")


PARTITION_KEYS = ("dataset", "test-fraction", "seed", "partitioner", "dirichlet-alpha",
                  "classes-per-client", "validation-fraction", "min-partition-size")


def preflight(study: Study) -> None:
    """Load every dataset and make every split the study needs before any cell starts: a
    dataset that cannot be loaded offline, or a split that cannot be drawn (say Dirichlet 0.1
    among 500 clients with a floor of 10 examples), is one error now, not one per cell an hour
    in. The splits are stored, so the cells only read them."""
    from server_app.build import prepare_partitions

    point = study.tuning_point()
    configs = [{**study.base, **p, **arm.config, "seed": seed}
               for p in study.points() for arm in study.arms for seed in study.seeds]
    if study.tuning.budget:
        configs += [{**study.base, **point, **arm.config, "seed": study.tuning.seed,
                     "validation-fraction": study.tuning.validation_fraction}
                    for arm in study.arms]
    splits = {}
    for config in configs:
        cfg = RunConfig.from_mapping({k: v for k, v in config.items() if k in PARTITION_KEYS})
        splits[tuple(cfg.to_dict()[k] for k in PARTITION_KEYS)] = cfg
    for cfg in splits.values():
        try:
            prepare_partitions(cfg, study.clients)
        except ConfigError as err:
            raise StudyError(f"{err} (seed {cfg.seed})") from None


def run_study(study: Study, out: Path, jobs: int, say: Callable[[str], None] = print
              ) -> dict[str, dict[str, Any]]:
    """Tuning first (its results choose the final cells' values), then the final cells."""
    preflight(study)
    calibrator = Calibrator(out / "calibration.json")
    results = execute(tuning_cells(study, calibrator), out, jobs, say)
    return execute(final_cells(study, calibrator, results), out, jobs, say)
