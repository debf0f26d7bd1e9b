"""The run's privacy plan and ledger: calibration before round 1, epsilon after every round, and
the budget stop before a round that would overspend.

Every round is accounted as the event the strategy really ran (its sampling, population, the
noise multiplier its aggregate carries) and composed *before* the round's results are recorded,
so no released model is ever missing from the epsilon. ``target-epsilon`` is a cap as well as a
calibration target: a run (also a resumed one) never ends above it.
"""

from __future__ import annotations

import dataclasses
import math
from logging import INFO, WARNING

from flwr.common import log

from plateau.config import RunConfig
from plateau.privacy.accounting import (
    DELTA_POPULATION_FACTOR,
    PrivacyAccountant,
    RoundEvent,
    calibrate_noise,
    default_delta,
    epsilon_per_client,
)
from plateau.privacy.mechanism import GaussianClientDP, mechanism_from_config
from plateau.privacy.sampling import ClientSampler

LARGE_EPSILON = 10.0  # above this a run is warned that its guarantee is weak

TRUST = {
    "central": "the server sees every clipped update and adds all the noise (trusted server)",
    "distributed": "each of the m sampled clients adds sigma*C/sqrt(m) and the server tops up "
                   "missing or rejected shares; the aggregate is as private as central, "
                   "individual uploads only carry their share (secure aggregation would be "
                   "needed to hide them)",
    "local": "each client adds sigma*C itself: every upload is private on its own (nothing is "
             "trusted but the run config; SuperNodes can enforce floors in their node config)",
}


class PrivacyLedger:
    """The accountant of one run and the event each of its rounds adds."""

    def __init__(self, config: RunConfig, population: int) -> None:
        sampler = ClientSampler(config.sampling_method, config.sample_rate, secret=False)
        self.config = config
        self.population = population
        self.delta = config.target_delta or default_delta(population)
        self.event = event_for(config, population, config.noise_multiplier)
        self.expected_cohort = sampler.expected_cohort(population)
        self.accountant = PrivacyAccountant(config.accountant, config.sampling_method)

    @property
    def epsilon(self) -> float:
        """Spent so far, at the run's delta."""
        return self.accountant.epsilon(self.delta)

    @property
    def budget(self) -> tuple[float, str] | None:
        """The epsilon no round may exceed and the key that sets it: the smaller of
        target-epsilon and max-epsilon among those set."""
        caps = [(value, name) for value, name in ((self.config.target_epsilon, "target-epsilon"),
                                                  (self.config.max_epsilon, "max-epsilon"))
                if value > 0]
        return min(caps) if caps else None

    def next_round_fits(self, event: RoundEvent) -> tuple[bool, float]:
        """Whether one more round of ``event`` (what the wired mechanism will perform, which is
        what ``commit_round`` will compose) stays within the budget, and the epsilon after it."""
        after = self.accountant.epsilon_after(event, self.delta)
        return (self.budget is None or after <= self.budget[0]), after

    def epsilon_against_server(self, releases: int) -> float | None:
        """Epsilon of one client that handed the server ``releases`` uploads, against the
        server (which knows when it sampled it, so no amplification): local placement's point,
        and what distributed placement gives without secure aggregation. None in central
        placement, where the server sees clipped updates."""
        mechanism = mechanism_from_config(self.config)
        if not isinstance(mechanism, GaussianClientDP) or not mechanism.noise.client_shares:
            return None
        per_upload = (mechanism.client_noise_std(self.expected_cohort)
                      / mechanism.clip_norm)
        return epsilon_per_client(per_upload, releases, self.delta)

    def commit_round(self, performed: RoundEvent | None) -> float:
        """Account for a round whose noisy aggregate now exists, as the event the mechanism
        says it performed (not the plan: noise that was not added is never counted); epsilon
        after it. A formally private run whose round came without an event is refused."""
        if performed is None:
            raise RuntimeError("a round was released without the accounting event of its "
                               "noise; refusing to record a privacy claim for it")
        if performed != self.event:
            log(WARNING, "round accounted as performed (%s), not as planned (%s)", performed,
                self.event)
        self.accountant.compose(performed)
        return self.epsilon

    def planned_epsilon(self) -> float:
        """Epsilon after all num-server-rounds rounds, if none is stopped early."""
        return self.accountant.epsilon_after(self.event, self.delta,
                                             self.config.num_server_rounds)


def event_for(config: RunConfig, population: int, noise_multiplier: float) -> RoundEvent:
    """The round event of this config (sampling, q, N, m) at a given noise multiplier sigma:
    the aggregate carries sigma (central, distributed) or sigma*sqrt(m) (local)."""
    sampler = ClientSampler(config.sampling_method, config.sample_rate, secret=False)
    placement = GaussianClientDP(config.clip_norm, noise_multiplier, placement=config.dp)
    carried = placement.accounted_noise_multiplier(sampler.expected_cohort(population))
    return RoundEvent(noise_multiplier=carried, sampling=config.sampling_method,
                      population=population, sample_rate=config.sample_rate,
                      cohort=sampler.cohort_size(population))


def plan_privacy(config: RunConfig, population: int, *, calibrate: bool = True,
                 void_reason: str | None = None) -> tuple[RunConfig, PrivacyLedger | None]:
    """Calibrate sigma if asked, log the plan, and return the (possibly updated) config with its
    ledger; None when the run makes no formal claim (no DP, the code clip mode, BatchNorm). A
    run that claims no epsilon (``void_reason``: a test seed) still keeps its ledger, but its
    plan line names no planned epsilon."""
    mechanism = mechanism_from_config(config)
    if mechanism is None:
        return config, None
    log(INFO, "dp=%r: %s", config.dp, TRUST[config.dp])
    if not mechanism.formally_dp or config.norm == "batch":
        log(WARNING, "no epsilon is reported: %s", "the authors' per-tensor median clip is not "
            "differentially private" if not mechanism.formally_dp
            else "BatchNorm statistics are released without protection")
        return config, None
    delta = config.target_delta or default_delta(population)
    if config.target_epsilon > 0 and calibrate:
        sigma = calibrate_noise(
            lambda s: event_for(config, population, s), config.num_server_rounds,
            config.target_epsilon, delta, config.accountant, config.sampling_method)
        log(INFO, "calibrated noise-multiplier = %.4f (was %g) for epsilon <= %g after %d "
            "rounds", sigma, config.noise_multiplier, config.target_epsilon,
            config.num_server_rounds)
        config = dataclasses.replace(config, noise_multiplier=sigma)
    ledger = PrivacyLedger(config, population)
    if delta > DELTA_POPULATION_FACTOR / population:
        log(WARNING, "target-delta=%g is above %g/N = %g: delta*N is the chance that a "
            "mechanism failing with probability delta leaks someone outright", delta,
            DELTA_POPULATION_FACTOR, DELTA_POPULATION_FACTOR / population)
    cohort = ledger.expected_cohort
    planned = ledger.planned_epsilon()
    log(INFO, "privacy plan: N=%d clients, q=%g (%s sampling, expected cohort %.1f), sigma=%.4f, "
        "C=%g, %d rounds, accountant %s, delta=%g (%s), planned epsilon=%s", population,
        config.sample_rate, config.sampling_method, cohort, config.noise_multiplier,
        config.clip_norm, config.num_server_rounds, config.accountant, delta,
        "target-delta" if config.target_delta else "min(1e-5, 0.01/N)",
        f"none ({void_reason})" if void_reason is not None
        else f"{planned:.4f}" if math.isfinite(planned) else "inf (no noise)")
    if void_reason is None and math.isfinite(planned) and planned > LARGE_EPSILON:
        log(WARNING, "epsilon after the planned %d rounds is %.1f, above %g: a weak guarantee "
            "(published DP training usually reports epsilon between 1 and 8); more noise "
            "(noise-multiplier, or target-epsilon), fewer rounds, a lower sample-rate or more "
            "clients lower it (README: Choosing C, sigma and epsilon)",
            config.num_server_rounds, planned, LARGE_EPSILON)
    if ledger.budget is not None:
        log(INFO, "budget: the run stops before any round that would take epsilon above %g "
            "(%s)", *ledger.budget)
    return config, ledger
