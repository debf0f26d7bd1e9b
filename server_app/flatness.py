"""Flatness probes of the global model: SAM sharpness and the top Hessian eigenvalue.

Both papers claim flatter global minima; these make the claim measurable per round. They run on a
fixed batch of the held-out split that the server already holds for evaluation, so they release
nothing about any client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plateau.config import RunConfig
from plateau.data import held_out_tensors
from plateau.models import input_spec, load_travelling, model_from_config
from plateau.seeds import stream_generator

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _norm(vectors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in vectors]))


def sam_sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float,
                  loss_fn: LossFn = F.cross_entropy) -> float:
    """L(w + rho * g/|g|) - L(w): the loss increase of one normalised ascent step of radius rho."""
    params = _trainable(model)
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params)
    norm = float(_norm(list(grads)))
    if norm == 0:
        return 0.0
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=rho / norm)
        perturbed = float(loss_fn(model(x), y))
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    return perturbed - float(loss.detach())


def top_hessian_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int,
                           generator: torch.Generator, loss_fn: LossFn = F.cross_entropy) -> float:
    """Largest-magnitude Hessian eigenvalue by power iteration with Hessian-vector products."""
    params = _trainable(model)
    grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
              for p in params]
    norm = _norm(vector)
    vector = [v / norm for v in vector]
    eigenvalue = 0.0
    for _ in range(iters):
        hvp = torch.autograd.grad(grads, params, grad_outputs=vector, retain_graph=True)
        eigenvalue = float(sum((h * v).sum() for h, v in zip(hvp, vector, strict=True)))
        norm = _norm(list(hvp))
        if float(norm) == 0:
            return 0.0
        vector = [h.detach() / norm for h in hvp]
    return eigenvalue


@dataclass(frozen=True)
class Flatness:
    """The two probes of one model."""

    sharpness: float
    hessian_top_eigenvalue: float


class FlatnessProbe:
    """Measures the global model on a fixed held-out batch (same batch every round)."""

    def __init__(self, config: RunConfig, device: torch.device) -> None:
        self.config = config
        self.model = model_from_config(config).to(device)
        data = held_out_tensors(config.dataset, test_fraction=config.test_fraction,
                                seed=config.seed, max_examples=config.max_test_examples,
                                spec=input_spec(config),
                                validation_fraction=config.validation_fraction)
        generator = stream_generator(config.seed, "flatness-batch")
        pick = torch.randperm(len(data), generator=generator)[: config.sharpness_batch_size]
        self.x, self.y = data.x[pick].to(device), data.y[pick].to(device)

    def due(self, server_round: int) -> bool:
        """Whether this round is measured (every ``sharpness-every`` rounds)."""
        every = self.config.sharpness_every
        return every > 0 and server_round % every == 0

    def __call__(self, state: dict[str, torch.Tensor], server_round: int) -> Flatness:
        """Both probes, in eval mode (BatchNorm uses running statistics)."""
        load_travelling(self.model, state)
        self.model.eval()
        return Flatness(
            sharpness=sam_sharpness(self.model, self.x, self.y, self.config.sharpness_rho),
            hessian_top_eigenvalue=top_hessian_eigenvalue(
                self.model, self.x, self.y, self.config.sharpness_iters,
                stream_generator(self.config.seed, "flatness-probe", server_round)),
        )
