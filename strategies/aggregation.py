"""How a round's accepted uploads become the one released mean a server rule reads.

``PlainAggregation`` (no privacy: the mean, optionally weighted by examples) and
``PrivateAggregation`` (client-level DP: the mechanism's clip-then-noise sum over the public
expected cohort, with the accounting event it performed) have the same interface, so a strategy
never branches on whether privacy is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from plateau.privacy.accounting import RoundEvent
from plateau.privacy.mechanism import PrivacyMechanism, Tensors, weighted_mean
from plateau.privacy.noise import secure_source
from plateau.privacy.sampling import ClientSampler, Cohort

from .screening import ClientUpload


@dataclass(frozen=True)
class Aggregate:
    """The round's released mean, with the public numbers it was formed with: what a server
    rule reads (never the individual uploads)."""

    mean: Tensors
    denominator: float  # the expected cohort under DP, the number of clients averaged otherwise
    population: int  # N, canaries included
    noise_multiplier: float | None = None  # the accounted noise on the sum, over C (None: no DP)
    # what the mechanism performed this round, for the ledger: the noise it added and the
    # sampling that chose the cohort (None without a formal guarantee)
    event: RoundEvent | None = None


class Aggregation(Protocol):
    """Turns a round's uploads into its released mean."""

    mechanism: PrivacyMechanism | None

    def aggregate(self, uploads: list[ClientUpload], extra: list[Tensors], cohort: Cohort,
                  template: Tensors, support: Tensors | None, server_round: int,
                  population: int) -> Aggregate | None:
        """The released mean (None: nothing to release, the model stays)."""

    def event(self, population: int) -> RoundEvent | None:
        """The accounting event one round of this aggregation performs (None: no claim)."""

    def metrics(self, cohort: Cohort, released_dim: int) -> dict[str, float]:
        """The round's metrics of the mechanism."""


class PlainAggregation:
    """No privacy: the mean of the accepted updates, by example count with
    ``weighting='num-examples'``, else uniform."""

    mechanism = None

    def __init__(self, weighting: str) -> None:
        self.weighting = weighting

    def aggregate(self, uploads: list[ClientUpload], extra: list[Tensors], cohort: Cohort,
                  template: Tensors, support: Tensors | None, server_round: int,
                  population: int) -> Aggregate | None:
        """The weighted mean over the clients that replied; None when none did."""
        if not uploads:
            return None
        weights = [float(u.num_examples) if self.weighting == "num-examples" else 1.0
                   for u in uploads]
        return Aggregate(weighted_mean([u.update for u in uploads], weights, template),
                         float(len(uploads)), population)

    def event(self, population: int) -> RoundEvent | None:
        return None

    def metrics(self, cohort: Cohort, released_dim: int) -> dict[str, float]:
        return {}

    def __str__(self) -> str:
        return "off"


class PrivateAggregation:
    """Client-level DP: the mechanism clips, sums and noises (its placement says who adds which
    share), the mean's denominator is the public expected cohort, and the round's accounting
    event is the one this mechanism performs, not the plan."""

    def __init__(self, mechanism: PrivacyMechanism, sampler: ClientSampler) -> None:
        self.mechanism = mechanism
        self.sampler = sampler

    def event(self, population: int) -> RoundEvent | None:
        """The noise this mechanism adds over an expected cohort of N, and the sampling that
        chooses it (None when the mechanism has no formal noise scale)."""
        expected = self.sampler.expected_cohort(population)
        multiplier = self.mechanism.accounted_noise_multiplier(expected)
        if multiplier is None:
            return None
        return RoundEvent(noise_multiplier=multiplier, sampling=self.sampler.method,
                          population=population, sample_rate=self.sampler.sample_rate,
                          cohort=self.sampler.cohort_size(population))

    def aggregate(self, uploads: list[ClientUpload], extra: list[Tensors], cohort: Cohort,
                  template: Tensors, support: Tensors | None, server_round: int,
                  population: int) -> Aggregate:
        """The privatised mean of the uploads and ``extra`` (the audit's canaries), with noise
        drawn from OS entropy even when no client replied."""
        mean = self.mechanism.aggregate(
            [u.update for u in uploads] + extra, cohort.expected, template,
            secure_source("server-noise", server_round), support=support)
        event = self.event(population)
        return Aggregate(mean, cohort.expected, population,
                         None if event is None else event.noise_multiplier, event)

    def metrics(self, cohort: Cohort, released_dim: int) -> dict[str, float]:
        """The noise multiplier per released coordinate that the aggregate carries."""
        multiplier = self.mechanism.effective_noise_multiplier(cohort.expected, released_dim)
        return {} if multiplier is None else {"effective-noise-multiplier": multiplier}

    def __str__(self) -> str:
        return str(self.mechanism)


def aggregation_for(mechanism: PrivacyMechanism | None, sampler: ClientSampler,
                    weighting: str) -> Aggregation:
    """The aggregation of a privacy mechanism (None: no privacy)."""
    if mechanism is None:
        return PlainAggregation(weighting)
    return PrivateAggregation(mechanism, sampler)
