"""Every algorithm, one module each: its server rule, its client rule(s) and its typed
hyper-parameters, registered once (``strategies.registry``). The tables below are derived."""

from __future__ import annotations

from strategies.registry import algorithms, local_rules

from .base import PlateauStrategy

ALGORITHMS = algorithms()
STRATEGIES: dict[str, type[PlateauStrategy]] = {
    name: algorithm.strategy for name, algorithm in ALGORITHMS.items()}
LOCAL_RULES = local_rules()

__all__ = ["ALGORITHMS", "LOCAL_RULES", "STRATEGIES", "PlateauStrategy"]
