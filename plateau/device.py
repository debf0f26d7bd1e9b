"""Device choice and seed derivation shared by the server and the clients."""

from __future__ import annotations

import numpy as np
import torch


def resolve_device(choice: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error, not a fallback."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device (torch "
                           f"{torch.__version__}); use device='cpu' or install a CUDA torch")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from several integers (e.g. run seed, round, partition id)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU torch generator for reproducible sampling (never for DP noise)."""
    return torch.Generator().manual_seed(derive_seed(*parts))
