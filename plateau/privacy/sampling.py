"""Which clients train in a round, sampled the way the privacy accountant assumes.

* ``poisson``: every client of the population joins independently with probability q; the
  expected cohort q*N is the (public) denominator of the mean.
* ``fixed``: max(1, floor(q*N)) of the N population slots uniformly without replacement.

The population N is the set of clients the accounting is about, not just the nodes that happen to
be connected: each partition id 0..N-1 is a slot, and a sampled slot without a connected node is a
client that cannot reply (a dropout), so connected clients are never sampled more often than the
accountant assumes.

Under DP the coins come from a fresh ChaCha20 keystream keyed by the operating system for every
round (:mod:`plateau.privacy.noise`): amplification by sampling only holds if nobody can predict or
reconstruct who was sampled, so no sampler state exists to be stored or restored. Without DP they
come from the run's seed and the round number, so runs are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..seeds import stream_rng
from .noise import secure_source


@dataclass(frozen=True)
class Cohort:
    """A round's sample: the nodes to contact, the expected cohort size (the denominator) and
    every sampled slot (including those without a node: dropouts, and the audit's canaries)."""

    nodes: list[int]
    expected: float
    population: int
    slots: tuple[int, ...] = ()


class ClientSampler:
    """Poisson or fixed-size sampling over a population of N clients.

    Parameters
    ----------
    method : str
        ``"poisson"`` or ``"fixed"``.
    sample_rate : float
        q, the probability (Poisson) or fraction (fixed) of clients per round.
    secret : bool
        Draw from a fresh OS-keyed keystream each round (DP runs) instead of ``seed`` and the
        round.
    seed : int
        Seed of the reproducible (non-secret) draws.
    """

    def __init__(self, method: str, sample_rate: float, *, secret: bool, seed: int = 0) -> None:
        if method not in ("poisson", "fixed"):
            raise ValueError(f"sampling={method!r}; expected 'poisson' or 'fixed'")
        self.method = method
        self.sample_rate = sample_rate
        self.secret = secret
        self.seed = seed

    def cohort_size(self, population: int) -> int:
        """m for fixed-size sampling."""
        return max(1, math.floor(self.sample_rate * population))

    def expected_cohort(self, population: int) -> float:
        """q*N (Poisson) or m (fixed): the public denominator of the round's mean."""
        if self.method == "poisson":
            return self.sample_rate * population
        return float(self.cohort_size(population))

    def sample(self, slots: Mapping[int, int], population: int, server_round: int) -> Cohort:
        """Sample a round's cohort from a population of N slots (partition ids 0..N-1);
        ``slots`` maps the slots with a connected node to that node. A sampled slot without
        one is a dropout. Coins go by slot, so a seeded run samples the same partitions
        whatever node ids the nodes got."""
        if len(slots) > population or any(not 0 <= slot < population for slot in slots):
            raise ValueError(f"{len(slots)} nodes hold partitions {min(slots, default=0)}.."
                             f"{max(slots, default=0)} but the population is {population}: set "
                             "population-size to cover every partition")
        keys = self._uniforms(population, server_round)
        if self.method == "poisson":
            chosen = np.flatnonzero(keys < self.sample_rate)
        else:
            # the m smallest of N uniform keys: a uniformly random m-subset of the N slots
            chosen = np.sort(np.argsort(keys, kind="stable")[:self.cohort_size(population)])
        picked = [slots[int(slot)] for slot in chosen if int(slot) in slots]
        return Cohort(nodes=picked, expected=self.expected_cohort(population),
                      population=population, slots=tuple(int(slot) for slot in chosen))

    def _uniforms(self, count: int, server_round: int) -> np.ndarray:
        """``count`` uniforms in (0, 1): secret (a fresh keystream) or from the seed and round."""
        if self.secret:
            return secure_source("sampling", server_round).uniform_(
                torch.empty(count, dtype=torch.float64)).numpy()
        return stream_rng(self.seed, "cohort", server_round).random(count)
