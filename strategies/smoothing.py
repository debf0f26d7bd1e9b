"""Implicit Laplacian smoothing, (I - lambda*L)^-1, applied by the server to a noisy aggregate.

Osher et al., "Laplacian Smoothing Gradient Descent" (2018); Liang et al., "Exploring Private
Federated Learning with Laplacian Smoothing" (2020). L is the periodic 1-D discrete Laplacian
(stencil [1, -2, 1]) on the flattened tensor, diagonalised by the FFT:

    (I - lambda*L)^-1 u = IFFT( FFT(u) / (1 + 4*lambda*sin^2(pi*k/d)) ).

Every eigenvalue of the operator lies in (0, 1], so it damps high frequencies (the noise) and
never amplifies anything; the constant vector (k = 0) passes unchanged. Post-processing of a
released aggregate, so it costs no privacy. (The authors' explicit stencils subtract the Laplacian
for 2-D/4-D tensors, which sharpens instead; that is deliberately not reproduced.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from plateau.config import Params, key


@dataclass(frozen=True)
class SmoothingParams(Params):
    """Strength of the implicit Laplacian smoother (key ``ls-sigma``)."""

    prefix = "ls"
    sigma: float = key(1.0, "fedpgn-ls, fedavg-ls: Laplacian-smoothing strength lambda of "
                       "(I - lambda*L)^-1; 0 = identity.", min=0)


def smoothing_spectrum(length: int, strength: float, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Eigenvalues 1 / (1 + 4*lambda*sin^2(pi*k/d)) for the rfft frequencies k = 0..d//2."""
    k = torch.arange(length // 2 + 1, device=device, dtype=dtype)
    return 1.0 / (1.0 + 4.0 * strength * torch.sin(math.pi * k / length) ** 2)


def laplacian_smooth(tensor: torch.Tensor, strength: float) -> torch.Tensor:
    """(I - strength*L)^-1 applied to the flattened tensor; same shape and dtype back. Every
    size goes through the same operator: for d = 2 (a binary head's bias) the periodic
    Laplacian is 2*[[-1, 1], [1, -1]], not zero; for d = 1 it is zero (the identity)."""
    if strength == 0 or tensor.numel() == 0:
        return tensor.clone()
    flat = tensor.reshape(-1).double()
    spectrum = torch.fft.rfft(flat) * smoothing_spectrum(flat.numel(), strength, flat.device)
    return torch.fft.irfft(spectrum, n=flat.numel()).reshape(tensor.shape).to(tensor.dtype)
