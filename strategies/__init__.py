"""Server-side rules of every algorithm, one file each, built on a shared base."""

from __future__ import annotations

from .base import PlateauStrategy
from .fedavg import FedAvg
from .fednsam import FedNSAM
from .fedpgn import FedPGN
from .fedpgn_ls import FedPGNLS

STRATEGIES: dict[str, type[PlateauStrategy]] = {
    "fedavg": FedAvg,
    "fedpgn": FedPGN,
    "fedpgn-ls": FedPGNLS,
    "fednsam": FedNSAM,
}

__all__ = ["STRATEGIES", "FedAvg", "FedNSAM", "FedPGN", "FedPGNLS", "PlateauStrategy"]
