"""Server-side rules of every algorithm, one file each, built on a shared base."""

from __future__ import annotations

from .base import PlateauStrategy
from .fedavg import FedAvg

STRATEGIES: dict[str, type[PlateauStrategy]] = {
    "fedavg": FedAvg,
}

__all__ = ["STRATEGIES", "FedAvg", "PlateauStrategy"]
