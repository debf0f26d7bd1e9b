"""The client-level DP mechanism: flat clipping and Gaussian noise, in one of three placements.

Client-level DP protects a whole client's data: each client releases one vector v_i (its model
update, or whatever its algorithm says is private), flat-clipped to L2 norm <= C over all released
tensors together. The noisy sum ``sum_i v_i + N(0, (sigma*C)^2 I)`` then has sensitivity C and
noise multiplier sigma, whichever party adds the noise:

* ``central``: the server adds N(0, (sigma*C)^2) to the sum (it sees clipped individual updates);
* ``distributed``: each client adds N(0, (sigma*C)^2 / m), m the expected cohort; the server tops
  up whatever variance missing clients did not add, so the sum always carries (sigma*C)^2;
* ``local``: each client adds the full N(0, (sigma*C)^2), so every upload is private on its own.

The mean divides by the *expected* cohort (q*N with Poisson sampling, m with fixed-size sampling:
public numbers), never by the number that replied, so a missing or rejected client cannot change
the scale of the noise relative to the sensitivity.

Noise is drawn with torch on the tensors' device from a generator seeded by the operating system,
never from the run's public ``seed`` (a known seed would let anyone subtract the noise).
"""

from __future__ import annotations

import math
import os
import secrets
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .device import derive_seed

if TYPE_CHECKING:
    from .config import RunConfig

Tensors = dict[str, torch.Tensor]
PLACEMENTS = ("central", "distributed", "local")
TEST_SEED_ENV = "PLATEAU_TEST_SEED"


def flat_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """One L2 norm over all tensors together (not per tensor)."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors.values()])
    ))


def clip_flat(tensors: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[Tensors, float]:
    """Scale all tensors by min(1, C/||v||) with one norm over all of them; return the norm too."""
    norm = flat_norm(tensors)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: t * scale if scale < 1.0 else t.clone() for k, t in tensors.items()}, norm


def noise_generator(device: torch.device | str = "cpu", *stream: int) -> torch.Generator:
    """A torch generator on ``device`` seeded from the OS entropy pool.

    Only for tests of exact reproducibility (crash-resume): with ``PLATEAU_TEST_SEED`` set, the
    seed derives from it and ``stream`` instead. The run then logs that its noise is predictable.
    """
    generator = torch.Generator(device=device)
    test_seed = test_seed_override()
    generator.manual_seed(derive_seed(test_seed, 1, *stream) if test_seed is not None
                          else secrets.randbits(63))
    return generator


def test_seed_override() -> int | None:
    """The PLATEAU_TEST_SEED environment variable, if set (testing only: NOT private)."""
    value = os.environ.get(TEST_SEED_ENV)
    return int(value) if value else None


def add_gaussian(
    tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator,
    support: Mapping[str, torch.Tensor] | None = None,
) -> Tensors:
    """Add i.i.d. N(0, std^2) to every coordinate (or only where ``support`` is 1), drawn on
    each tensor's own device."""
    if std == 0:
        return dict(tensors)
    noised = {}
    for k, t in tensors.items():
        noise = torch.normal(0.0, std, t.shape, generator=generator, device=t.device,
                             dtype=t.dtype)
        noised[k] = t + (noise if support is None else noise * support[k])
    return noised


def random_support(template: Mapping[str, torch.Tensor], keep: float, seed: int
                   ) -> Tensors:
    """A public random 0/1 mask keeping a fraction ``keep`` of the coordinates: the same for
    every client of a round (it is derived from public numbers, so it reveals nothing)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(t.shape, generator=generator) < keep).to(t.device, t.dtype)
            for k, t in template.items()}


@dataclass(frozen=True)
class ClipReport:
    """What clipping did to one client's update (diagnostics, not part of the release)."""

    norm: float
    clipped: bool
    error: float


class PrivacyMechanism(Protocol):
    """Client side: ``release``; server side: ``accepts_norm``, ``aggregate``."""

    placement: str
    formally_dp: bool

    def release(
        self, update: Mapping[str, torch.Tensor], cohort: float, generator: torch.Generator,
        support: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[Tensors, ClipReport]:
        """Clip one client's released vector and add its share of the noise."""
        ...

    def accepts_norm(self, norm: float, dim: int, cohort: float) -> bool:
        """Whether an upload of this norm (over ``dim`` coordinates) can be honest."""
        ...

    def aggregate(
        self, updates: Sequence[Mapping[str, torch.Tensor]], cohort: float,
        template: Mapping[str, torch.Tensor], generator: torch.Generator,
        support: Mapping[str, torch.Tensor] | None = None,
    ) -> Tensors:
        """Noisy sum of the uploads divided by the expected cohort."""
        ...

    def effective_noise_multiplier(self, cohort: float, num_aggregated: int) -> float | None:
        """Noise std on the round's sum over C; None when there is no guarantee."""
        ...


@dataclass(frozen=True)
class GaussianClientDP:
    """Flat clipping to ``clip_norm`` and Gaussian noise with multiplier ``noise_multiplier``."""

    clip_norm: float
    noise_multiplier: float
    placement: str = "central"
    formally_dp: bool = True

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}; expected one of {PLACEMENTS}")
        if not self.clip_norm > 0 or self.noise_multiplier < 0:
            raise ValueError("clip_norm must be > 0 and noise_multiplier >= 0")

    def client_noise_std(self, cohort: float) -> float:
        """Per-coordinate std each client adds before upload (0 in central placement)."""
        if self.placement == "central":
            return 0.0
        if self.placement == "distributed":
            return self.noise_multiplier * self.clip_norm / math.sqrt(max(cohort, 1.0))
        return self.noise_multiplier * self.clip_norm

    def server_noise_std(self, cohort: float, num_aggregated: int) -> float:
        """What the server adds so the sum carries sigma*C however many clients replied.

        Central: all of it. Distributed: the variance of the shares that missing clients did not
        add (none when the expected cohort replied). Local: nothing (each upload is noised).
        """
        if self.placement == "local":
            return 0.0
        target = (self.noise_multiplier * self.clip_norm) ** 2
        added = num_aggregated * self.client_noise_std(cohort) ** 2
        return math.sqrt(max(0.0, target - added))

    def release(
        self, update: Mapping[str, torch.Tensor], cohort: float, generator: torch.Generator,
        support: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[Tensors, ClipReport]:
        """Client side: clip the update flat to C, then add this client's share of the noise
        (on the ``support`` coordinates only, when the release is a public subset)."""
        if support is not None:
            update = {k: t * support[k] for k, t in update.items()}
        clipped, norm = clip_flat(update, self.clip_norm)
        noised = add_gaussian(clipped, self.client_noise_std(cohort), generator, support)
        report = ClipReport(norm=norm, clipped=norm > self.clip_norm,
                            error=max(0.0, norm - self.clip_norm))
        return noised, report

    def accepts_norm(self, norm: float, dim: int, cohort: float) -> bool:
        """Server side: whether an upload can be a clipped update plus this client's noise.

        Un-noised (central) uploads must have norm <= C. A noised one is at most C plus the
        norm of d-dimensional Gaussian noise, which concentrates at std*sqrt(d) with spread
        std/sqrt(2): C + std*(sqrt(d) + 10) rejects an honest client with negligible probability
        and still stops an oversized upload from moving the model.
        """
        bound = self.clip_norm + self.client_noise_std(cohort) * (math.sqrt(dim) + 10)
        return norm <= bound * (1 + 1e-5) + 1e-9

    def aggregate(
        self, updates: Sequence[Mapping[str, torch.Tensor]], cohort: float,
        template: Mapping[str, torch.Tensor], generator: torch.Generator,
        support: Mapping[str, torch.Tensor] | None = None,
    ) -> Tensors:
        """Server side: (sum of uploads + the server's share of the noise) / expected cohort."""
        total = sum_updates(updates, template)
        if support is not None:
            total = {k: t * support[k] for k, t in total.items()}
        noised = add_gaussian(total, self.server_noise_std(cohort, len(updates)), generator,
                              support)
        return {k: t / cohort for k, t in noised.items()}

    def effective_noise_multiplier(self, cohort: float, num_aggregated: int) -> float:
        """Noise std on the round's sum over C: never below sigma (central noise, or client
        shares topped up by the server); above it when more clients than expected added shares
        or, in local placement, when several clients each added sigma*C."""
        shares = num_aggregated * self.client_noise_std(cohort) ** 2
        total = self.server_noise_std(cohort, num_aggregated) ** 2 + shares
        return math.sqrt(total) / self.clip_norm


@dataclass(frozen=True)
class PerTensorMedianClip:
    """The authors' privatiser (DP-FedPGN ``DP_new.py``), offered to reproduce their numbers.

    NOT formally DP: the threshold C_i is the median of the client's own per-tensor norms (it
    depends on private data), each tensor is clipped separately (sensitivity C*sqrt(L), not C),
    and each client adds N(0, (sigma*C_i)^2/m). No epsilon can be claimed for it.
    """

    noise_multiplier: float
    placement: str = "distributed"
    formally_dp: bool = False

    def release(
        self, update: Mapping[str, torch.Tensor], cohort: float, generator: torch.Generator,
        support: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[Tensors, ClipReport]:
        """Per-tensor clip at the median tensor norm, then per-client noise sigma*C_i/sqrt(m)."""
        if support is not None:
            update = {k: t * support[k] for k, t in update.items()}
        norms = {k: float(torch.linalg.vector_norm(t.double())) for k, t in update.items()}
        threshold = statistics.median(norms.values()) if norms else 0.0
        clipped = {
            k: t * min(1.0, threshold / norms[k]) if norms[k] > 0 else t.clone()
            for k, t in update.items()
        }
        error = flat_norm({k: update[k] - clipped[k] for k in update})
        std = self.noise_multiplier * threshold / math.sqrt(max(cohort, 1.0))
        report = ClipReport(norm=flat_norm(update), clipped=error > 0, error=error)
        return add_gaussian(clipped, std, generator, support), report

    def accepts_norm(self, norm: float, dim: int, cohort: float) -> bool:
        """The threshold is the client's own, so no bound can be checked."""
        return True

    def aggregate(
        self, updates: Sequence[Mapping[str, torch.Tensor]], cohort: float,
        template: Mapping[str, torch.Tensor], generator: torch.Generator,
        support: Mapping[str, torch.Tensor] | None = None,
    ) -> Tensors:
        """Sum of the noised uploads over the expected cohort."""
        return {k: t / cohort for k, t in sum_updates(updates, template).items()}

    def effective_noise_multiplier(self, cohort: float, num_aggregated: int) -> float | None:
        """No guarantee, so no multiplier to account."""
        return None


def mechanism_from_config(config: RunConfig) -> PrivacyMechanism | None:
    """The mechanism a run config asks for (None without DP); the same on server and clients."""
    if not config.dp_enabled:
        return None
    if config.dp_clip_mode == "code":
        return PerTensorMedianClip(config.noise_multiplier, placement=config.dp)
    return GaussianClientDP(config.clip_norm, config.noise_multiplier, placement=config.dp)


def sum_updates(
    updates: Sequence[Mapping[str, torch.Tensor]], template: Mapping[str, torch.Tensor]
) -> Tensors:
    """Element-wise sum of client updates; zeros shaped like ``template`` when there are none."""
    total = {k: torch.zeros_like(t) for k, t in template.items()}
    for update in updates:
        for k in total:
            total[k] += update[k]
    return total


def weighted_mean(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
    template: Mapping[str, torch.Tensor],
) -> Tensors:
    """Weighted mean of client updates (used without DP)."""
    total_weight = float(sum(weights))
    mean = {k: torch.zeros_like(t) for k, t in template.items()}
    for update, weight in zip(updates, weights, strict=True):
        for k in mean:
            mean[k] += update[k] * (weight / total_weight)
    return mean
