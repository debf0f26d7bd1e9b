"""A study spec: one TOML file declares the grid, the arms, their tuning and the scales.

::

    title = "..."            description = "..."
    clients = 500            seeds = [0, 1, 2]       target-accuracy = 0.6  (optional)
    [base]                   run-config keys every cell shares
    [grid]                   run-config key -> list of values; every combination is a point
    [tuning]                 budget (trials per arm), validation-fraction, seed, at (a point)
    [[arms]]                 name, config (keys of this arm), tune (key -> candidate values)
    [scales.<name>]          clients / seeds / base / grid overrides (e.g. 'paper' for a GPU)

``target-epsilon`` in the grid means *equal epsilon*: the runner calibrates sigma once per
(epsilon, q, T, delta) and every arm runs with that same sigma (and the epsilon as a cap).
Every key is checked against the run-config schema when the spec is loaded.
"""

from __future__ import annotations

import itertools
import random
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plateau.config import ConfigError, RunConfig

SPEC_KEYS = {"title", "description", "clients", "seeds", "target-accuracy", "base", "grid",
             "tuning", "arms", "scales"}
TUNING_KEYS = {"budget", "validation-fraction", "seed", "at", "rounds"}
ARM_KEYS = {"name", "config", "tune", "note"}
SCALE_KEYS = {"clients", "seeds", "base", "grid", "tuning"}
# set by the runner for every cell; a spec that sets them would be overwritten silently
RUNNER_KEYS = {"results-dir", "run-name", "seed", "checkpoint", "resume", "metrics-port",
               "validation-fraction"}


class SpecError(ValueError):
    """A study spec that cannot be run as written."""


@dataclass(frozen=True)
class Arm:
    """One algorithm variant: its own keys and the values its tuning may choose from."""

    name: str
    config: dict[str, Any]
    tune: dict[str, list[Any]] = field(default_factory=dict)
    note: str = ""

    def trials(self, budget: int, salt: str) -> list[dict[str, Any]]:
        """The tuning points: ``budget`` distinct points of the product of the arm's candidate
        values, so every arm gets the same number of trials (all of them when its space is
        smaller). A Latin draw by a fixed stream per (study, arm): each key cycles through its
        values in a shuffled order, so with a budget of at least a key's number of values every
        value is tried (a plain random draw once gave FedSAM three trials at its worst lr)."""
        keys = sorted(self.tune)
        space = [dict(zip(keys, values, strict=True))
                 for values in itertools.product(*(self.tune[k] for k in keys))]
        if len(space) <= budget:
            return space
        stream = random.Random(f"{salt}/{self.name}")
        orders = {k: stream.sample(self.tune[k], len(self.tune[k])) for k in keys}
        chosen: list[dict[str, Any]] = []
        for index in range(budget):
            point = {k: orders[k][(index + index // len(orders[k]) * (k_index + 1))
                                  % len(orders[k])]
                     for k_index, k in enumerate(keys)}
            if point in chosen:  # the cycles met again: any point not yet tried
                point = stream.choice([p for p in space if p not in chosen])
            chosen.append(point)
        return chosen


@dataclass(frozen=True)
class Tuning:
    """Same budget per arm, scored on a validation split carved out of the training data."""

    budget: int = 0
    validation_fraction: float = 0.1
    seed: int = 0
    at: dict[str, Any] = field(default_factory=dict)
    rounds: int = 0  # 0 = the study's num-server-rounds


@dataclass(frozen=True)
class Study:
    """A validated spec at one scale."""

    name: str
    title: str
    description: str
    clients: int
    seeds: list[int]
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    arms: list[Arm]
    tuning: Tuning
    scale: str = "default"
    target_accuracy: float | None = None
    path: Path | None = None

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values, in the spec's order."""
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True))
                for values in itertools.product(*(self.grid[k] for k in keys))]

    def tuning_point(self) -> dict[str, Any]:
        """Where the arms are tuned: ``tuning.at``, else the first value of every axis."""
        return {key: self.tuning.at.get(key, values[0]) for key, values in self.grid.items()}


def _check_keys(where: str, table: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _check_run_keys(where: str, keys: Mapping[str, Any]) -> None:
    known = set(RunConfig.keys())
    for key in keys:
        if key not in known:
            raise SpecError(f"{where}: {key!r} is not a run-config key (see README 'Run config')")
        if key in RUNNER_KEYS:
            raise SpecError(f"{where}: {key!r} is managed by the study runner for every cell")


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**base, **(extra or {})}


def load_spec(path: Path, scale: str = "default") -> Study:
    """Read and validate a spec; every cell's config is checked against the schema here, so a
    typo stops the study before its first run, not hours into it."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SpecError(f"{path}: {err}") from None
    _check_keys(str(path), raw, SPEC_KEYS)
    scales = raw.get("scales", {})
    if scale != "default":
        if scale not in scales:
            raise SpecError(f"{path}: no scale {scale!r}; allowed: "
                            f"{['default', *sorted(scales)]}")
        override = scales[scale]
        _check_keys(f"{path} [scales.{scale}]", override, SCALE_KEYS)
        raw = {**raw, **{k: v for k, v in override.items() if k not in ("base", "tuning")},
               "base": _merge(raw.get("base", {}), override.get("base")),
               "tuning": _merge(raw.get("tuning", {}), override.get("tuning"))}
    base, grid = dict(raw.get("base", {})), dict(raw.get("grid", {}))
    _check_run_keys(f"{path} [base]", base)
    _check_run_keys(f"{path} [grid]", grid)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{path} [grid]: {key!r} must be a non-empty list of values")
    tuning_raw = dict(raw.get("tuning", {}))
    _check_keys(f"{path} [tuning]", tuning_raw, TUNING_KEYS)
    tuning = Tuning(budget=int(tuning_raw.get("budget", 0)),
                    validation_fraction=float(tuning_raw.get("validation-fraction", 0.1)),
                    seed=int(tuning_raw.get("seed", 0)), at=dict(tuning_raw.get("at", {})),
                    rounds=int(tuning_raw.get("rounds", 0)))
    _check_run_keys(f"{path} [tuning.at]", tuning.at)
    for key, value in tuning.at.items():
        if value not in grid.get(key, [value]):
            raise SpecError(f"{path} [tuning.at]: {key}={value!r} is not among the grid's "
                            f"values {grid.get(key)}")
    arms = []
    for index, arm in enumerate(raw.get("arms", [])):
        where = f"{path} [[arms]] #{index + 1}"
        _check_keys(where, arm, ARM_KEYS)
        if "name" not in arm:
            raise SpecError(f"{where}: every arm needs a name")
        _check_run_keys(where, arm.get("config", {}))
        _check_run_keys(f"{where} tune", arm.get("tune", {}))
        tune = {k: list(v) if isinstance(v, list) else [v] for k, v in arm.get("tune", {}).items()}
        arms.append(Arm(str(arm["name"]), dict(arm.get("config", {})), tune,
                        str(arm.get("note", ""))))
    if not arms:
        raise SpecError(f"{path}: a study needs at least one [[arms]]")
    if len({a.name for a in arms}) != len(arms):
        raise SpecError(f"{path}: arm names must be unique")
    seeds = [int(s) for s in raw.get("seeds", [0])]
    target = raw.get("target-accuracy")
    study = Study(name=Path(path).stem, title=str(raw.get("title", Path(path).stem)),
                  description=str(raw.get("description", "")).strip(),
                  clients=int(raw.get("clients", 10)), seeds=seeds, base=base, grid=grid,
                  arms=arms, tuning=tuning, scale=scale,
                  target_accuracy=None if target is None else float(target), path=Path(path))
    if study.clients < 1 or not seeds:
        raise SpecError(f"{path}: clients must be >= 1 and seeds non-empty")
    _validate_cells(study)
    return study


def _validate_cells(study: Study) -> None:
    """Every (arm, point, tuning value) must make a valid run config."""
    for arm in study.arms:
        variants = arm.trials(study.tuning.budget, study.name) or [{}]
        for point in study.points():
            for variant in variants:
                config = {**study.base, **point, **arm.config, **variant}
                if config.get("dp", "off") == "off" or config.get("dp-clip-mode") == "code":
                    config.pop("target-epsilon", None)  # no epsilon: the runner drops it too
                try:
                    RunConfig.from_mapping(config)
                except ConfigError as err:
                    raise SpecError(f"{study.path}: arm {arm.name!r} at {point} {variant}: "
                                    f"{err}") from None
