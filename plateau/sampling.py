"""Which clients train in a round, sampled the way the privacy accountant assumes.

* ``poisson``: every client of the population joins independently with probability q; the
  expected cohort q*N is the (public) denominator of the mean.
* ``fixed``: max(1, floor(q*N)) of the N population slots uniformly without replacement.

The population N is the set of clients the accounting is about, not just the nodes that happen to
be connected: a sampled slot without a connected node is a client that cannot reply (a dropout),
so connected clients are never sampled more often than the accountant assumes.

Under DP the coins come from a generator seeded by the operating system: amplification by
sampling only holds if nobody can predict who was sampled. Without DP they come from the run's
seed and the round number, so runs are reproducible.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .device import derive_seed
from .privacy import test_seed_override


@dataclass(frozen=True)
class Cohort:
    """A round's sample: the nodes to contact and the expected cohort size (the denominator)."""

    nodes: list[int]
    expected: float
    population: int


class ClientSampler:
    """Poisson or fixed-size sampling over a population of N clients.

    Parameters
    ----------
    method : str
        ``"poisson"`` or ``"fixed"``.
    sample_rate : float
        q, the probability (Poisson) or fraction (fixed) of clients per round.
    secret : bool
        Draw from an OS-seeded generator (DP runs) instead of ``seed`` and the round.
    seed : int
        Seed of the reproducible (non-secret) draws.
    """

    def __init__(self, method: str, sample_rate: float, *, secret: bool, seed: int = 0) -> None:
        if method not in ("poisson", "fixed"):
            raise ValueError(f"sampling={method!r}; expected 'poisson' or 'fixed'")
        self.method = method
        self.sample_rate = sample_rate
        self.seed = seed
        test_seed = test_seed_override()
        entropy = derive_seed(test_seed, 2) if test_seed is not None else secrets.randbits(128)
        self.secret_rng = np.random.default_rng(entropy) if secret else None

    def state(self) -> dict | None:
        """The secret generator's state (for checkpoints); None when draws are seeded."""
        return self.secret_rng.bit_generator.state if self.secret_rng is not None else None

    def restore(self, state: dict | None) -> None:
        """Continue the secret generator from a checkpoint."""
        if self.secret_rng is not None and state is not None:
            self.secret_rng.bit_generator.state = state

    def cohort_size(self, population: int) -> int:
        """m for fixed-size sampling."""
        return max(1, math.floor(self.sample_rate * population))

    def expected_cohort(self, population: int) -> float:
        """q*N (Poisson) or m (fixed): the public denominator of the round's mean."""
        if self.method == "poisson":
            return self.sample_rate * population
        return float(self.cohort_size(population))

    def sample(self, nodes: Sequence[int], population: int, server_round: int) -> Cohort:
        """Sample a round's cohort from the connected ``nodes`` of a population of N."""
        if len(nodes) > population:
            raise ValueError(f"{len(nodes)} nodes are connected but the population is "
                             f"{population}: set population-size to at least {len(nodes)}")
        rng = self.secret_rng or np.random.default_rng(derive_seed(self.seed, server_round))
        ordered = sorted(nodes)
        if self.method == "poisson":
            joined = rng.random(len(ordered)) < self.sample_rate
            picked = [node for node, coin in zip(ordered, joined, strict=True) if coin]
        else:
            slots = rng.choice(population, size=self.cohort_size(population), replace=False)
            picked = [ordered[int(i)] for i in sorted(slots) if i < len(ordered)]
        return Cohort(nodes=picked, expected=self.expected_cohort(population),
                      population=population)
