"""The client-level DP mechanism: flat clipping and Gaussian noise, in one of three placements.

Client-level DP protects a whole client's data: each client releases one vector v_i (its model
update, or whatever its algorithm says is private), flat-clipped to L2 norm <= C over all released
tensors together. Neighbouring federations differ by **zero-out**: one client's data replaced by a
null client that releases a zero vector; the client's node still takes part, is sampled, replies
and adds its noise share, so every count is the same in both worlds. The noisy sum
``sum_i v_i + N(0, V)`` then has sensitivity C, whichever party adds the noise:

* ``central``: the server adds all of V = (sigma*C)^2 to the sum (it sees clipped updates);
* ``distributed``: each of the m clients of a fixed-size cohort adds V/m; the server tops up the
  shares of clients that failed or were rejected, so the sum always carries exactly V;
* ``local``: each client adds (sigma*C)^2, so every upload is private on its own; the server tops
  the sum up to m*(sigma*C)^2, so the aggregate's noise is the same whoever replied.

The aggregate's noise never depends on how many clients took part, and the mean divides by a
public number (q*N, or m), so the released models do not reveal the count. A client share counts
only for what its upload's norm proves (``credited_share``); the server adds the rest for every
slot, so a client that adds part of its share cannot thin the aggregate's noise. Where the norm
test cannot tell (too few released coordinates) nothing is credited: the total is then 2V.
Noise shaped to pass the norm test is screened too (``screen_shape``): a share put into a few
coordinates exceeds the per-coordinate maximum, a block left bare lacks its share of the
energy, and a share left out of most coordinates leaves too many near zero. Shapes beyond these
tests are not detected; secure aggregation is the remedy for an untrusted server's view.

Noise comes from :mod:`plateau.privacy.noise` (ChaCha20 keyed by the OS per release, float64
Gaussians).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from .noise import NoiseSource, add_noise_all

if TYPE_CHECKING:
    from ..config import RunConfig

Tensors = dict[str, torch.Tensor]
# Laurent-Massart tail exponent of the upload norm tests: an honest upload fails one with
# probability below exp(-40) = 4e-18.
NORM_TEST_EXPONENT = 40.0
SHAPE_BLOCK = 1024  # coordinates per block of the shape screen's energy test
SHAPE_LEVELS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5)  # |x|/s levels of its small-values test


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
    """Client side: ``release``; server side: ``screen``, ``aggregate``."""

    placement: str
    formally_dp: bool

    def release(
        self, update: Mapping[str, torch.Tensor], cohort: float, source: NoiseSource,
        support: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[Tensors, ClipReport]:
        """Clip one client's released vector and add its share of the noise."""
        ...

    def screen(self, norm: float, dim: int, cohort: float) -> str | None:
        """Why an upload of this norm (over ``dim`` noised coordinates) cannot be honest, or
        None when it can."""
        ...

    def screen_shape(self, update: Mapping[str, torch.Tensor], cohort: float,
                     support: Mapping[str, torch.Tensor] | None = None) -> str | None:
        """Why an upload's noise cannot be the isotropic share it owes, or None."""
        ...

    def aggregate(
        self, updates: Sequence[Mapping[str, torch.Tensor]], cohort: float,
        template: Mapping[str, torch.Tensor], source: NoiseSource,
        support: Mapping[str, torch.Tensor] | None = None,
    ) -> Tensors:
        """Noisy sum of the uploads divided by the public cohort size."""
        ...

    def effective_noise_multiplier(self, cohort: float, dim: int) -> float | None:
        """Noise std on the round's sum over C; None when there is no guarantee."""
        ...

    def accounted_noise_multiplier(self, cohort: float) -> float | None:
        """The multiplier the accountant is told: never above the effective one."""
        ...


@dataclass(frozen=True)
class CentralNoise:
    """The server adds all of V = (sigma*C)^2 to the sum of clipped updates (trusted server)."""

    name = "central"
    client_shares = False

    def accounted_multiplier(self, sigma: float, cohort: float) -> float:
        """The noise on the round's sum over C."""
        return sigma

    def client_std(self, sigma: float, clip_norm: float, cohort: float) -> float:
        """Per-coordinate std each client adds before upload."""
        return 0.0


@dataclass(frozen=True)
class DistributedNoise:
    """Each of the m clients of a fixed-size cohort adds V/m; the server tops up missing or
    uncredited shares, so the sum carries V."""

    name = "distributed"
    client_shares = True

    def accounted_multiplier(self, sigma: float, cohort: float) -> float:
        return sigma

    def client_std(self, sigma: float, clip_norm: float, cohort: float) -> float:
        return sigma * clip_norm / math.sqrt(max(cohort, 1.0))


@dataclass(frozen=True)
class LocalNoise:
    """Each client adds V itself (every upload private on its own); the sum carries m V."""

    name = "local"
    client_shares = True

    def accounted_multiplier(self, sigma: float, cohort: float) -> float:
        return sigma * math.sqrt(max(cohort, 1.0))

    def client_std(self, sigma: float, clip_norm: float, cohort: float) -> float:
        return sigma * clip_norm


NOISE_PLACEMENTS = {p.name: p for p in (CentralNoise(), DistributedNoise(), LocalNoise())}


@dataclass(frozen=True)
class GaussianClientDP:
    """Flat clipping to ``clip_norm`` and Gaussian noise with multiplier ``noise_multiplier``,
    placed by one of ``NOISE_PLACEMENTS`` (who adds which share; the crediting of client shares
    and the server's top-up below are the same for both placements with client shares).

    ``cohort`` is the public cohort size: q*N under Poisson sampling (central placement only), m
    under fixed-size sampling (required by distributed and local placement, whose noise shares
    must not reveal how many clients took part).
    """

    clip_norm: float
    noise_multiplier: float
    placement: str = "central"
    formally_dp: bool = True

    def __post_init__(self) -> None:
        if self.placement not in NOISE_PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}; expected one of "
                             f"{tuple(NOISE_PLACEMENTS)}")
        if not self.clip_norm > 0 or self.noise_multiplier < 0:
            raise ValueError("clip_norm must be > 0 and noise_multiplier >= 0")

    @property
    def noise(self) -> CentralNoise | DistributedNoise | LocalNoise:
        """The placement's arithmetic."""
        return NOISE_PLACEMENTS[self.placement]

    def accounted_noise_multiplier(self, cohort: float) -> float:
        """sigma, or sigma*sqrt(m) in local placement, whose aggregate carries m shares."""
        return self.noise.accounted_multiplier(self.noise_multiplier, cohort)

    def client_noise_std(self, cohort: float) -> float:
        """Per-coordinate std each client adds before upload (0 in central placement)."""
        return self.noise.client_std(self.noise_multiplier, self.clip_norm, cohort)

    def share_floor(self, dim: int, cohort: float) -> float:
        """Smallest norm an honest noised upload has except with probability exp(-40):
        ||clip(v) + z|| >= ||z|| - C, and ||z||^2 >= s^2 (d - 2 sqrt(40 d)) (Laurent-Massart)."""
        std = self.client_noise_std(cohort)
        chi2_low = dim - 2.0 * math.sqrt(NORM_TEST_EXPONENT * dim)
        return std * math.sqrt(max(0.0, chi2_low)) - self.clip_norm

    def verifies_shares(self, dim: int, cohort: float) -> bool:
        """Whether the norm test can tell an upload without its noise share (norm <= C) from
        an honest one; it cannot when few coordinates are released or the share is small."""
        return self.client_noise_std(cohort) > 0 and self.share_floor(dim, cohort) > self.clip_norm

    def credited_share(self, dim: int, cohort: float) -> float:
        """The noise variance an accepted upload is credited with: what passing the floor
        proves. Its noise norm is at least floor - C, and isotropic Gaussian noise of std s_i
        has norm at most s_i sqrt(d + 2 sqrt(40 d) + 80) (Laurent-Massart, exp(-40)), so
        s_i >= (floor - C) / sqrt(d + 2 sqrt(40 d) + 80). A client adding only part of its
        share gets no more credit than an honest one, and the server adds the difference."""
        if not self.verifies_shares(dim, cohort):
            return 0.0
        x = NORM_TEST_EXPONENT
        proven = ((self.share_floor(dim, cohort) - self.clip_norm)
                  / math.sqrt(dim + 2.0 * math.sqrt(x * dim) + 2.0 * x))
        return min(proven, self.client_noise_std(cohort)) ** 2

    def server_noise_std(self, cohort: float, num_aggregated: int, dim: int) -> float:
        """What the server adds so the sum's noise is the same however many uploads it sums.

        Central: all of it. Distributed and local: the shares of the m - n clients whose upload
        is missing, plus, for each of the m slots, what an accepted share is not credited with
        (``credited_share``): the noise a client is trusted to add is only what its upload
        proves, and the total is a constant that never depends on who replied. Without
        verifiable shares nothing is credited.
        """
        target = (self.accounted_noise_multiplier(cohort) * self.clip_norm) ** 2
        if not self.noise.client_shares:
            return math.sqrt(target)
        share = self.client_noise_std(cohort) ** 2
        missing = max(0.0, cohort - num_aggregated) * share
        uncredited = cohort * (share - self.credited_share(dim, cohort))
        return math.sqrt(missing + uncredited)

    def release(
        self, update: Mapping[str, torch.Tensor], cohort: float, source: NoiseSource,
        support: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[Tensors, ClipReport]:
        """Client side: clip the update flat to C, then add this client's share of the noise
        (on the ``support`` coordinates only, when the release is a public subset)."""
        if support is not None:
            update = {k: t * support[k] for k, t in update.items()}
        clipped, norm = clip_flat(update, self.clip_norm)
        noised = add_noise_all(clipped, self.client_noise_std(cohort), source, support)
        report = ClipReport(norm=norm, clipped=norm > self.clip_norm,
                            error=max(0.0, norm - self.clip_norm))
        return noised, report

    def screen(self, norm: float, dim: int, cohort: float) -> str | None:
        """Server side: whether an upload can be a clipped update plus this client's share.

        Un-noised (central) uploads must have norm <= C. A noised one lies within
        ||z|| -/+ C of its noise norm, which concentrates at s*sqrt(d) (Laurent-Massart bounds
        at exp(-40) either side): above the upper bound it could move the model too far, below
        the floor it is missing (part of) the share it owes, and the server tops that share up
        as if the client had failed.
        """
        std = self.client_noise_std(cohort)
        x = NORM_TEST_EXPONENT
        upper = self.clip_norm + std * math.sqrt(dim + 2.0 * math.sqrt(x * dim) + 2.0 * x)
        if norm > upper * (1 + 1e-5) + 1e-9:
            return "norm-exceeds-bound"
        if self.verifies_shares(dim, cohort) and norm < self.share_floor(dim, cohort):
            return "noise-share-missing"
        return None

    def screen_shape(self, update: Mapping[str, torch.Tensor], cohort: float,
                     support: Mapping[str, torch.Tensor] | None = None) -> str | None:
        """Server side, placements with client shares: whether the upload's noise can be the
        isotropic Gaussian share N(0, s^2 I) it owes, not a share concentrated where the norm
        test cannot see it. With x = clip(v) + z over the d released coordinates:

        * maximum: |x_j| <= C + s t for every j, where d P(|z| > s t) <= d exp(-t^2/2) =
          exp(-40), t = sqrt(2 (40 + ln d)): a share put into a few coordinates exceeds it;
        * energy: every block of ``SHAPE_BLOCK`` coordinates (the last one takes the rest) has
          ||x_B|| >= ||z_B|| - C >= s sqrt(B - 2 sqrt(B (40 + ln blocks))) - C
          (Laurent-Massart, union over the blocks): blocks left bare fail it. Blocks where that
          bound is not above C are not tested;
        * small values: for each a in ``SHAPE_LEVELS``, the fraction of coordinates with
          |x_j| <= a s is at most P(|z| <= a) + sqrt((40 + ln levels) / (2 d)). By Anderson's
          lemma P(|v_j + z_j| <= a s) <= P(|z_j| <= a s) whatever v_j, so Hoeffding bounds the
          honest count: noise left out of most coordinates (and squeezed under the maximum into
          the rest) fails it.

        An honest upload fails any of them with probability below 3 exp(-40), whatever its
        update. A share spread over most of the coordinates in a shape these tests do not
        see still passes; secure aggregation is the remedy for a server's view of uploads.
        """
        std = self.client_noise_std(cohort)
        if std <= 0:
            return None
        flat = torch.cat([
            (t if support is None else t[support[k].bool()]).reshape(-1).double()
            for k, t in update.items()]) if update else torch.zeros(0, dtype=torch.float64)
        dim = flat.numel()
        if dim == 0:
            return None
        x = NORM_TEST_EXPONENT
        magnitude = flat.abs()
        if float(magnitude.max()) > (self.clip_norm + std * math.sqrt(2.0 * (x + math.log(dim)))
                                     ) * (1 + 1e-6):
            return "noise-share-concentrated"
        blocks = max(1, dim // SHAPE_BLOCK)
        tail = x + math.log(blocks)
        full = (blocks - 1) * SHAPE_BLOCK  # whole blocks; the last one takes the rest
        for sizes, energy in ((SHAPE_BLOCK, flat[:full].reshape(-1, SHAPE_BLOCK).norm(dim=1)),
                              (dim - full, flat[full:].norm().reshape(1))):
            floor = std * math.sqrt(max(0.0, sizes - 2.0 * math.sqrt(sizes * tail))) \
                - self.clip_norm
            if energy.numel() and floor > self.clip_norm and float(energy.min()) < floor:
                return "noise-share-concentrated"
        slack = math.sqrt((x + math.log(len(SHAPE_LEVELS))) / (2.0 * dim))
        for level in SHAPE_LEVELS:
            honest = math.erf(level / math.sqrt(2.0))  # P(|z| <= level s)
            if float((magnitude <= level * std).double().mean()) > honest + slack:
                return "noise-share-concentrated"
        return None

    def aggregate(
        self, updates: Sequence[Mapping[str, torch.Tensor]], cohort: float,
        template: Mapping[str, torch.Tensor], source: NoiseSource,
        support: Mapping[str, torch.Tensor] | None = None,
    ) -> Tensors:
        """Server side: (sum of uploads + the server's noise) / public cohort size."""
        total = sum_updates(updates, template)
        if support is not None:
            total = {k: t * support[k] for k, t in total.items()}
        dim = released_dim(template, support)
        noised = add_noise_all(total, self.server_noise_std(cohort, len(updates), dim), source,
                               support)
        return {k: t / cohort for k, t in noised.items()}

    def effective_noise_multiplier(self, cohort: float, dim: int) -> float:
        """Noise std on the round's sum over C when every client is honest (the same whoever
        replied): sigma in central placement, sigma*sqrt(m) in local; in distributed and local
        placement times sqrt(2 - credited/share), the server's extra for uncredited noise
        (sqrt(2) where shares are not verifiable)."""
        accounted = self.accounted_noise_multiplier(cohort)
        if not self.noise.client_shares:
            return accounted
        credited = self.credited_share(dim, cohort) / self.client_noise_std(cohort) ** 2
        return accounted * math.sqrt(2.0 - credited)


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
        self, update: Mapping[str, torch.Tensor], cohort: float, source: NoiseSource,
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
        return add_noise_all(clipped, std, source, support), report

    def screen(self, norm: float, dim: int, cohort: float) -> str | None:
        """The threshold is the client's own, so no bound can be checked."""
        return None

    def screen_shape(self, update: Mapping[str, torch.Tensor], cohort: float,
                     support: Mapping[str, torch.Tensor] | None = None) -> str | None:
        """Nor a shape: the noise scale is the client's own too."""
        return None

    def aggregate(
        self, updates: Sequence[Mapping[str, torch.Tensor]], cohort: float,
        template: Mapping[str, torch.Tensor], source: NoiseSource,
        support: Mapping[str, torch.Tensor] | None = None,
    ) -> Tensors:
        """Sum of the noised uploads over the expected cohort."""
        return {k: t / cohort for k, t in sum_updates(updates, template).items()}

    def effective_noise_multiplier(self, cohort: float, dim: int) -> float | None:
        """No guarantee, so no multiplier to report."""
        return None

    def accounted_noise_multiplier(self, cohort: float) -> float | None:
        """No guarantee, so nothing to account."""
        return None


def released_dim(template: Mapping[str, torch.Tensor],
                 support: Mapping[str, torch.Tensor] | None = None) -> int:
    """How many coordinates are released (and noised): all, or the support's ones."""
    if support is None:
        return sum(t.numel() for t in template.values())
    return int(sum(float(m.sum()) for m in support.values()))


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
