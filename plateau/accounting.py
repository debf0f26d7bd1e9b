"""Privacy accounting: how much epsilon the rounds that actually ran have spent.

One small interface over Google's ``dp-accounting`` (the library Flower's own accountant wraps):
each round is one event — the Gaussian mechanism on the sum of flat-clipped client updates,
subsampled the way the strategy really sampled its cohort:

* Poisson sampling (each of the N clients joins independently with probability q), add/remove-one
  adjacency: ``PoissonSampledDpEvent(q, Gaussian(sigma))``. RDP or PLD (the tightest numbers).
* Fixed-size sampling (m of N without replacement), replace-one adjacency:
  ``SampledWithoutReplacementDpEvent(N, m, Gaussian(sigma / 2))``. Replacing one client moves the
  clipped sum by up to 2C, so the noise multiplier relative to that sensitivity is sigma/2.
  RDP only (the PLD accountant has no such event).

The accountant keeps a ledger of its events, so its state is a list of plain numbers that a
checkpoint can store and replay.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

ACCOUNTANTS = ("rdp", "pld")


class _SkippedOrderFilter(logging.Filter):
    """dp-accounting logs every fractional RDP order near 1 it cannot evaluate and then skips
    it (the remaining orders still bound epsilon); one such line per order and round is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_SkippedOrderFilter())
# the orders of DP-FedSAM's eps_computer (Opacus' analysis) plus dp-accounting's large ones
RDP_ORDERS = (*np.arange(1.01, 100, 0.05).round(2).tolist(), 128.0, 256.0, 512.0, 1024.0)


@dataclass(frozen=True)
class RoundEvent:
    """One round of the subsampled Gaussian mechanism, in public numbers only."""

    noise_multiplier: float
    sampling: str  # "poisson" | "fixed"
    population: int
    sample_rate: float  # q for Poisson
    cohort: int = 0  # m for fixed-size sampling

    def dp_event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event describing this round."""
        if self.noise_multiplier <= 0:
            return dp_accounting.NonPrivateDpEvent()
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(
                self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier))
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.cohort,
            dp_accounting.GaussianDpEvent(self.noise_multiplier / 2))


def neighbouring_relation(sampling: str) -> dp_accounting.NeighboringRelation:
    """Add/remove-one for Poisson sampling, replace-one for fixed-size sampling."""
    if sampling == "poisson":
        return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    return dp_accounting.NeighboringRelation.REPLACE_ONE


class PrivacyAccountant:
    """Composes round events and answers epsilon at a delta.

    Parameters
    ----------
    kind : str
        ``"rdp"`` (Renyi DP, orders 1.01..100 and beyond) or ``"pld"`` (privacy loss
        distributions: tighter, slower).
    sampling : str
        ``"poisson"`` or ``"fixed"``; decides the neighbouring relation.
    """

    def __init__(self, kind: str, sampling: str) -> None:
        if kind not in ACCOUNTANTS:
            raise ValueError(f"accountant={kind!r}; expected one of {ACCOUNTANTS}")
        if kind == "pld" and sampling != "poisson":
            raise ValueError("accountant='pld' supports Poisson sampling only; use 'rdp' for "
                             "sampling='fixed'")
        self.kind = kind
        self.sampling = sampling
        self.events: list[RoundEvent] = []
        self._accountant = self._fresh()

    def _fresh(self) -> dp_accounting.PrivacyAccountant:
        relation = neighbouring_relation(self.sampling)
        if self.kind == "rdp":
            return RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=relation)
        return PLDAccountant(neighboring_relation=relation, value_discretization_interval=1e-4)

    def compose(self, event: RoundEvent, count: int = 1) -> None:
        """Account for ``count`` rounds of ``event``."""
        self._accountant.compose(event.dp_event(), count)
        self.events.extend([event] * count)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first round, inf without noise)."""
        if not self.events:
            return 0.0
        return float(self._accountant.get_epsilon(delta))

    def epsilon_after(self, event: RoundEvent, delta: float, count: int = 1) -> float:
        """Epsilon that ``count`` more rounds of ``event`` would bring the total to."""
        trial = copy.deepcopy(self._accountant)
        trial.compose(event.dp_event(), count)
        return float(trial.get_epsilon(delta))

    def state(self) -> list[dict[str, float | int | str]]:
        """The ledger as plain data (for checkpoints)."""
        return [asdict(e) for e in self.events]

    @classmethod
    def from_state(cls, kind: str, sampling: str,
                   state: list[dict[str, float | int | str]]) -> PrivacyAccountant:
        """Rebuild an accountant by replaying a saved ledger."""
        accountant = cls(kind, sampling)
        for entry in state:
            accountant.compose(RoundEvent(**entry))  # type: ignore[arg-type]
        return accountant


def calibrate_noise(event_for: Callable[[float], RoundEvent], rounds: int,
                    target_epsilon: float, delta: float, kind: str, sampling: str,
                    rel_tol: float = 1e-4) -> float:
    """Smallest noise multiplier whose ``rounds`` rounds stay at or below ``target_epsilon``.

    ``event_for(sigma)`` builds the round event. Bisection keeps the upper end of the bracket
    feasible, so the answer always satisfies the target (never rounds the wrong way).
    """

    def spent(sigma: float) -> float:
        accountant = PrivacyAccountant(kind, sampling)
        return accountant.epsilon_after(event_for(sigma), delta, rounds)

    low, high = 0.0, 1.0
    while spent(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon <= {target_epsilon} in "
                             f"{rounds} rounds")
    while high - low > rel_tol * high:
        middle = (low + high) / 2
        if spent(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


def default_delta(population: int) -> float:
    """min(1e-5, 1/N): never weaker than the 1/N convention, never looser than 1e-5."""
    return min(1e-5, 1.0 / max(population, 1))
