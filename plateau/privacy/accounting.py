"""Privacy accounting: how much epsilon the rounds that actually ran have spent.

One small interface over two well-kept libraries (Opacus' RDP analysis, and Google's
``dp-accounting``, which Flower's own accountant wraps): each round is one event, the Gaussian
mechanism on the sum of flat-clipped client updates, subsampled the way the strategy really
sampled its cohort. Neighbouring federations differ by **zero-out** (one client's data replaced by
a null client that uploads zero; dp-accounting's ``REPLACE_SPECIAL``), so one client moves the
clipped sum by at most C:

* Poisson sampling (each of the N clients joins independently with probability q): the
  Poisson-subsampled Gaussian, whose zero-out analysis is the add/remove one. RDP (Opacus) or
  PLD (dp-accounting, tightest).
* Fixed-size sampling (m of N without replacement): dp-accounting's
  ``SampledWithoutReplacementDpEvent(N, m, Gaussian(sigma / 2))`` under its replace-one analysis.
  The cohort size is fixed, so the canary's place in a cohort is another client's in the
  neighbouring world: the two cohorts' sums differ by one client against another, up to 2C
  (a canary at +C among clients at -C), hence sigma/2. RDP only (the PLD accountant has no such
  event). With m = N nobody is left out and a round is the plain Gaussian at sigma.

``noise_multiplier`` is the multiplier the aggregate really carries (sigma, or sigma*sqrt(m) in
local placement, where every one of the m uploads is noised with sigma*C).

The accountant keeps a ledger of its events, so its state is a list of plain numbers that a
checkpoint can store and replay.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: a run without DP never pays for them (about 2 s)
    import dp_accounting


@functools.cache
def _opacus_rdp() -> tuple[Callable[..., np.ndarray], Callable[..., tuple]]:
    """Opacus' RDP analysis, imported on first use and without the root-logger handler Opacus
    installs on import (it would print every Flower log line twice)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    return compute_rdp, get_privacy_spent


ACCOUNTANTS = ("rdp", "pld")


class _SkippedOrderFilter(logging.Filter):
    """dp-accounting logs every fractional RDP order near 1 it cannot evaluate and then skips
    it (the remaining orders still bound epsilon); one such line per order and round is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_SkippedOrderFilter())
# finer between 2 and 10, where the optimum lies for the epsilons people use (1 to 30); orders
# below 2 only matter for very large epsilons and are the slow ones to evaluate
RDP_ORDERS = (1.02, *np.arange(1.05, 2.0, 0.05).round(2).tolist(),
              *np.arange(2.0, 10.0, 0.05).round(2).tolist(),
              *range(10, 65), 80.0, 128.0, 256.0, 512.0, 1024.0)


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
        import dp_accounting

        if self.noise_multiplier <= 0:
            return dp_accounting.NonPrivateDpEvent()
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(
                self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier))
        if self.cohort >= self.population:  # everyone, every round: no sampling to exploit
            return dp_accounting.GaussianDpEvent(self.noise_multiplier)
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.cohort,
            dp_accounting.GaussianDpEvent(self.noise_multiplier / 2))


def neighbouring_relation(sampling: str) -> dp_accounting.NeighboringRelation:
    """Zero-out for Poisson sampling; for fixed-size sampling dp-accounting's replace-one
    analysis at sensitivity 2C (see the module docstring)."""
    import dp_accounting

    if sampling == "poisson":
        return dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    return dp_accounting.NeighboringRelation.REPLACE_ONE


class _OpacusRdp:
    """RDP of the Poisson-subsampled Gaussian with Opacus' analysis, which evaluates fractional
    orders close to 1 that dp-accounting gives up on (so it is the tighter RDP bound). Its
    add/remove analysis is the zero-out one: in both, the pair is (1-q)N(0, s^2) + qN(1, s^2)
    against N(0, s^2)."""

    def __init__(self, orders: Sequence[float]) -> None:
        self.orders = np.asarray(orders, dtype=float)
        self.rdp = np.zeros_like(self.orders)
        self.per_round: dict[RoundEvent, np.ndarray] = {}  # a run repeats one event

    def compose(self, event: RoundEvent, count: int) -> None:
        if event.noise_multiplier <= 0:
            self.rdp = np.full_like(self.orders, np.inf)
            return
        if event not in self.per_round:
            compute_rdp, _ = _opacus_rdp()
            self.per_round[event] = compute_rdp(q=event.sample_rate,
                                                noise_multiplier=event.noise_multiplier,
                                                steps=1, orders=self.orders)
        self.rdp = self.rdp + count * self.per_round[event]

    def get_epsilon(self, delta: float) -> float:
        if np.isinf(self.rdp).all():
            return math.inf
        with warnings.catch_warnings():  # "optimal order is the smallest alpha" at huge epsilon
            warnings.simplefilter("ignore", UserWarning)
            _, get_privacy_spent = _opacus_rdp()
            return float(get_privacy_spent(orders=self.orders, rdp=self.rdp, delta=delta)[0])


class _Pld:
    """dp-accounting's PLD accountant, rebuilt from runs of identical rounds on every query:
    a run of T equal rounds is one self-composition (FFT), far cheaper than T convolutions."""

    def __init__(self) -> None:
        self.runs: list[tuple[RoundEvent, int]] = []

    def compose(self, event: RoundEvent, count: int) -> None:
        if self.runs and self.runs[-1][0] == event:
            self.runs[-1] = (event, self.runs[-1][1] + count)
        else:
            self.runs.append((event, count))

    def get_epsilon(self, delta: float) -> float:
        from dp_accounting.pld import PLDAccountant

        accountant = PLDAccountant(neighboring_relation=neighbouring_relation("poisson"),
                                   value_discretization_interval=1e-3)
        for event, count in self.runs:
            accountant.compose(event.dp_event(), count)
        return float(accountant.get_epsilon(delta))


class _DpAccounting:
    """dp-accounting's RDP accountant (sampling without replacement, replace-one)."""

    def __init__(self, accountant: dp_accounting.PrivacyAccountant) -> None:
        self.accountant = accountant

    def compose(self, event: RoundEvent, count: int) -> None:
        self.accountant.compose(event.dp_event(), count)

    def get_epsilon(self, delta: float) -> float:
        return float(self.accountant.get_epsilon(delta))


class PrivacyAccountant:
    """Composes round events and answers epsilon at a delta.

    Parameters
    ----------
    kind : str
        ``"rdp"`` (Renyi DP: Opacus' analysis for Poisson sampling, dp-accounting's for
        sampling without replacement) or ``"pld"`` (dp-accounting's privacy loss distributions:
        tighter, slower; Poisson only).
    sampling : str
        ``"poisson"`` or ``"fixed"``; decides the event and the neighbouring relation.
    orders : Sequence[float]
        RDP orders (``rdp`` only).
    """

    def __init__(self, kind: str, sampling: str, orders: Sequence[float] = RDP_ORDERS) -> None:
        if kind not in ACCOUNTANTS:
            raise ValueError(f"accountant={kind!r}; expected one of {ACCOUNTANTS}")
        if kind == "pld" and sampling != "poisson":
            raise ValueError("accountant='pld' supports Poisson sampling only; use 'rdp' for "
                             "sampling='fixed'")
        self.kind = kind
        self.sampling = sampling
        self.orders = tuple(orders)
        self.events: list[RoundEvent] = []
        self._backend = self._fresh()

    def _fresh(self) -> _OpacusRdp | _Pld | _DpAccounting:
        relation = neighbouring_relation(self.sampling)
        if self.kind == "pld":
            return _Pld()
        if self.sampling == "poisson":
            return _OpacusRdp(self.orders)
        from dp_accounting.rdp import RdpAccountant

        return _DpAccounting(RdpAccountant(orders=list(self.orders),
                                           neighboring_relation=relation))

    def compose(self, event: RoundEvent, count: int = 1) -> None:
        """Account for ``count`` rounds of ``event``."""
        if event.sampling != self.sampling:
            raise ValueError(f"a {event.sampling!r} round in a {self.sampling!r} accountant")
        self._backend.compose(event, count)
        self.events.extend([event] * count)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first round, inf without noise)."""
        if not self.events:
            return 0.0
        return self._backend.get_epsilon(delta)

    def epsilon_after(self, event: RoundEvent, delta: float, count: int = 1) -> float:
        """Epsilon that ``count`` more rounds of ``event`` would bring the total to."""
        trial = copy.deepcopy(self._backend)
        trial.compose(event, count)
        return trial.get_epsilon(delta)

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
    """Smallest noise multiplier (to ``rel_tol``) whose ``rounds`` rounds stay at or below
    ``target_epsilon``.

    ``event_for(sigma)`` builds the round event. Brent's method finds the crossing; the answer
    is then nudged up until it is feasible, so it never rounds the wrong way.
    """

    def gap(sigma: float) -> float:
        accountant = PrivacyAccountant(kind, sampling)
        return accountant.epsilon_after(event_for(sigma), delta, rounds) - target_epsilon

    low, high = 0.05, 1.0
    while gap(high) > 0:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon <= {target_epsilon:g} in "
                             f"{rounds} rounds at delta={delta:g}")
    sigma = high
    if gap(low) > 0:
        from scipy import optimize

        sigma = optimize.brentq(gap, low, high, xtol=rel_tol * low, rtol=rel_tol)
    while gap(sigma) > 0:
        sigma *= 1 + rel_tol
    return float(sigma)


DELTA_POPULATION_FACTOR = 0.01


def default_delta(population: int) -> float:
    """min(1e-5, 0.01/N): well below 1/N, so that even a mechanism that leaked each client
    outright with probability delta would leak anyone at all with probability at most 1%."""
    return min(1e-5, DELTA_POPULATION_FACTOR / max(population, 1))


def epsilon_per_client(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of ``releases`` Gaussian releases at ``noise_multiplier`` without any
    amplification: a client's protection against a server that knows when it was sampled."""
    if releases <= 0:
        return 0.0
    accountant = PrivacyAccountant("rdp", "poisson")
    accountant.compose(RoundEvent(noise_multiplier, "poisson", 1, 1.0), releases)
    return accountant.epsilon(delta)
