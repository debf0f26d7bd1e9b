"""Server-side rules of every algorithm, one file each, built on a shared base."""

from __future__ import annotations

from .base import PlateauStrategy
from .fedacg import FedACG
from .fedavg import FedAvg
from .fedavg_blur import FedAvgBLUR
from .fedavg_ls import FedAvgLS
from .fedavgm import FedAvgM
from .fedcm import FedCM
from .feddyn import FedDyn
from .fedgamma import FedGAMMA
from .fedlesam import FedLESAM
from .fednsam import FedNSAM
from .fedpgn import FedPGN
from .fedpgn_ls import FedPGNLS
from .fedsam import FedSAM
from .fedsmoo import FedSMOO
from .fedsmp import FedSMP
from .mofedsam import MoFedSAM
from .scaffold import Scaffold

STRATEGIES: dict[str, type[PlateauStrategy]] = {
    "fedavg": FedAvg,
    "fedpgn": FedPGN,
    "fedpgn-ls": FedPGNLS,
    "fednsam": FedNSAM,
    "fedavgm": FedAvgM,
    "fedacg": FedACG,
    "fedcm": FedCM,
    "scaffold": Scaffold,
    "feddyn": FedDyn,
    "fedsam": FedSAM,
    "mofedsam": MoFedSAM,
    "fedlesam": FedLESAM,
    "fedgamma": FedGAMMA,
    "fedsmoo": FedSMOO,
    "fedavg-ls": FedAvgLS,
    "fedsmp": FedSMP,
    "fedavg-blur": FedAvgBLUR,
}

__all__ = ["STRATEGIES", "PlateauStrategy"]
