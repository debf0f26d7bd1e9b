"""Device choice shared by the server and the clients (seeds: ``plateau.seeds``)."""

from __future__ import annotations

import torch


def resolve_device(choice: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error, not a fallback."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device (torch "
                           f"{torch.__version__}); use device='cpu' or install a CUDA torch")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)
