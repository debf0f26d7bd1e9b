"""Privacy accounting: cross-checked between libraries, tight, calibrated, stopping on budget."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.app import ArrayRecord, ConfigRecord
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from plateau.privacy.accounting import (
    RDP_ORDERS,
    PrivacyAccountant,
    RoundEvent,
    calibrate_noise,
    default_delta,
    epsilon_per_client,
)
from plateau.privacy.mechanism import GaussianClientDP
from server_app.loop import RunLoop
from server_app.privacy_plan import PrivacyLedger, plan_privacy
from strategies.fedavg import FedAvg
from tests.helpers import FakeGrid, make_config, reply

SIGMAS, RATES, ROUNDS, DELTAS = (0.5, 0.8, 1.0, 2.0), (0.01, 0.1, 0.5, 1.0), (1, 10, 100, 300), \
    (1e-5, 1e-3)
INTEGER_ORDERS = [*range(2, 65), 128, 256, 512]


def poisson(sigma: float, q: float) -> RoundEvent:
    return RoundEvent(noise_multiplier=sigma, sampling="poisson", population=1000, sample_rate=q)


def epsilons(accountant: PrivacyAccountant, event: RoundEvent) -> dict[tuple[int, float], float]:
    """Epsilon at every (T, delta) of the grid, composing the rounds incrementally."""
    found, done = {}, 0
    for rounds in ROUNDS:
        accountant.compose(event, rounds - done)
        done = rounds
        for delta in DELTAS:
            found[rounds, delta] = accountant.epsilon(delta)
    return found


@pytest.mark.parametrize(("sigma", "q"), list(itertools.product(SIGMAS, RATES)))
def test_rdp_matches_dp_accounting_on_the_whole_grid(sigma: float, q: float) -> None:
    """Our RDP (Opacus' analysis) against dp-accounting's, on the integer orders both evaluate
    exactly (dp-accounting skips fractional orders near 1 it cannot converge on)."""
    ours = epsilons(PrivacyAccountant("rdp", "poisson", orders=INTEGER_ORDERS), poisson(sigma, q))
    for (rounds, delta), epsilon in ours.items():
        reference = RdpAccountant(orders=INTEGER_ORDERS)
        reference.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(sigma)), rounds)
        assert epsilon == pytest.approx(reference.get_epsilon(delta), rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize(("sigma", "q"), list(itertools.product(SIGMAS, RATES)))
def test_pld_is_never_above_rdp_and_fine_orders_never_loosen_rdp(sigma: float, q: float) -> None:
    rdp = epsilons(PrivacyAccountant("rdp", "poisson"), poisson(sigma, q))
    pld = epsilons(PrivacyAccountant("pld", "poisson"), poisson(sigma, q))
    coarse = epsilons(PrivacyAccountant("rdp", "poisson", orders=INTEGER_ORDERS),
                      poisson(sigma, q))
    for key, epsilon in rdp.items():
        assert pld[key] <= epsilon * (1 + 1e-9), key
        assert epsilon <= coarse[key] * (1 + 1e-9), key


@pytest.mark.parametrize(("rounds", "at_1e5", "at_2e3"),
                         [(100, 12.35, 8.34), (200, 17.18, 12.20), (300, 21.22, 15.49)])
def test_reference_points_of_the_dp_fedsam_accountant(rounds: int, at_1e5: float,
                                                      at_2e3: float) -> None:
    """sigma 0.8, q 0.1: the values of DP-FedSAM's eps_computer (docs/algorithms.md §8)."""
    accountant = PrivacyAccountant("rdp", "poisson")
    accountant.compose(poisson(0.8, 0.1), rounds)
    assert accountant.epsilon(1e-5) == pytest.approx(at_1e5, abs=0.01)
    assert accountant.epsilon(2e-3) == pytest.approx(at_2e3, abs=0.01)


def test_everyone_every_round_is_the_plain_gaussian_at_sigma() -> None:
    """With m = N every round is the full Gaussian mechanism on a sum that zeroing one client
    moves by at most C: RDP alpha * T / (2 sigma^2), converted here independently."""
    sigma, rounds, delta = 3.0, 20, 1e-5
    accountant = PrivacyAccountant("rdp", "fixed")
    accountant.compose(RoundEvent(sigma, "fixed", 50, 1.0, cohort=50), rounds)
    orders = np.array(RDP_ORDERS, dtype=float)
    rdp = orders * rounds / (2 * sigma ** 2)
    expected = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]
    assert accountant.epsilon(delta) == pytest.approx(expected, rel=0.02)


def test_fixed_size_cohorts_are_accounted_at_sensitivity_2c() -> None:
    """N = 10, m = 1, sigma = 1: a canary at +C among clients at -C gives the pair
    0.1 N(2) + 0.9 N(0) against 0.1 N(1) + 0.9 N(0), whose exact epsilon at 1e-5 is at least
    3.75 (a review computed it by PLD); accounting at sensitivity C printed 2.28."""
    accountant = PrivacyAccountant("rdp", "fixed")
    accountant.compose(RoundEvent(1.0, "fixed", 10, 0.1, cohort=1))
    assert accountant.epsilon(1e-5) >= 3.75
    reference = RdpAccountant(orders=list(RDP_ORDERS),
                              neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    reference.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        10, 1, dp_accounting.GaussianDpEvent(0.5)))
    assert accountant.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize(("sigma", "q"), [(0.8, 0.1), (1.0, 0.5), (2.0, 1.0)])
def test_poisson_accounting_is_the_zero_out_relation(sigma: float, q: float) -> None:
    """Zero-out (dp-accounting's REPLACE_SPECIAL) is the relation stated: for the
    Poisson-subsampled Gaussian its numbers equal add/remove's, in both RDP and PLD."""
    for accountant_class, kwargs in ((RdpAccountant, {"orders": INTEGER_ORDERS}),
                                     (dp_accounting.pld.PLDAccountant, {})):
        values = []
        for relation in (dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
                         dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
            reference = accountant_class(neighboring_relation=relation, **kwargs)
            reference.compose(dp_accounting.PoissonSampledDpEvent(
                q, dp_accounting.GaussianDpEvent(sigma)), 50)
            values.append(reference.get_epsilon(1e-5))
        assert values[0] == pytest.approx(values[1], rel=1e-9)
    ours = PrivacyAccountant("pld", "poisson")
    ours.compose(poisson(sigma, q), 50)
    reference = dp_accounting.pld.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
        value_discretization_interval=1e-3)
    reference.compose(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(sigma)), 50)
    assert ours.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_a_clients_epsilon_against_the_server_has_no_amplification() -> None:
    """k uploads at multiplier s: the Gaussian mechanism composed k times, RDP k*alpha/(2 s^2)."""
    orders = np.array(RDP_ORDERS, dtype=float)
    expected = get_privacy_spent(orders=orders, rdp=orders * 7 / (2 * 1.5 ** 2), delta=1e-5)[0]
    assert epsilon_per_client(1.5, 7, 1e-5) == pytest.approx(expected, rel=1e-6)
    assert epsilon_per_client(1.5, 0, 1e-5) == 0.0


def test_pld_refuses_fixed_size_sampling() -> None:
    with pytest.raises(ValueError, match="Poisson sampling only"):
        PrivacyAccountant("pld", "fixed")


def test_no_noise_means_infinite_epsilon_and_nothing_spent_before_round_one() -> None:
    accountant = PrivacyAccountant("rdp", "poisson")
    assert accountant.epsilon(1e-5) == 0.0
    accountant.compose(poisson(0.0, 0.1))
    assert math.isinf(accountant.epsilon(1e-5))


def test_a_saved_ledger_replays_to_the_same_epsilon() -> None:
    accountant = PrivacyAccountant("pld", "poisson")
    accountant.compose(poisson(1.1, 0.05), 7)
    accountant.compose(poisson(0.9, 0.05), 3)
    again = PrivacyAccountant.from_state("pld", "poisson", accountant.state())
    assert again.epsilon(1e-5) == accountant.epsilon(1e-5) > 0


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "sampling", "target"),
                         [("rdp", "poisson", 4.0), ("pld", "poisson", 2.0),
                          ("rdp", "fixed", 8.0)])
def test_calibration_round_trips(kind: str, sampling: str, target: float) -> None:
    def event(sigma: float) -> RoundEvent:
        return RoundEvent(sigma, sampling, 50, 0.2, cohort=10)

    sigma = calibrate_noise(event, 30, target, 1e-5, kind, sampling)
    spent = PrivacyAccountant(kind, sampling).epsilon_after(event(sigma), 1e-5, 30)
    assert 0.99 * target <= spent <= target
    slightly_less = PrivacyAccountant(kind, sampling).epsilon_after(event(sigma * 0.99), 1e-5, 30)
    assert slightly_less > target  # the smallest such sigma, to 1%


def test_the_plan_calibrates_sigma_into_the_config() -> None:
    config = make_config(dp="central", target_epsilon=4.0, num_server_rounds=30,
                         sample_rate=0.2, accountant="pld")
    calibrated, ledger = plan_privacy(config, population=50)
    assert ledger is not None and calibrated.noise_multiplier != config.noise_multiplier
    assert 0.99 * 4.0 <= ledger.planned_epsilon() <= 4.0
    assert ledger.delta == 1e-5 and ledger.expected_cohort == pytest.approx(10.0)


def test_a_run_that_claims_no_epsilon_plans_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 31: a test-seeded run still logged "planned epsilon=...", a claim it never
    makes. Its plan line now says none; the ledger is still kept (and charged)."""
    import server_app.privacy_plan as privacy_plan

    lines: list[str] = []
    monkeypatch.setattr(privacy_plan, "log", lambda level, text, *args: lines.append(
        text % args if args else text))
    config = make_config(dp="central", noise_multiplier=1.0)
    _, ledger = plan_privacy(config, population=20, void_reason="PLATEAU_TEST_SEED is set")
    assert ledger is not None
    (plan,) = [line for line in lines if line.startswith("privacy plan")]
    assert "planned epsilon=none (PLATEAU_TEST_SEED is set)" in plan
    lines.clear()
    plan_privacy(config, population=20)
    (plan,) = [line for line in lines if line.startswith("privacy plan")]
    assert re.search(r"planned epsilon=\d+\.\d{4}$", plan)


def test_a_planned_epsilon_above_ten_is_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 32: the README's DP-FedAvg line gave epsilon 51 after 20 rounds in silence."""
    import server_app.privacy_plan as privacy_plan

    lines: list[str] = []
    monkeypatch.setattr(privacy_plan, "log", lambda level, text, *args: lines.append(
        text % args if args else text))
    weak = make_config(dp="central", noise_multiplier=0.5, num_server_rounds=20,
                       sample_rate=0.5)
    _, ledger = plan_privacy(weak, population=20)
    assert ledger is not None and ledger.planned_epsilon() > 10
    assert [line for line in lines if "above 10: a weak guarantee" in line]
    lines.clear()
    plan_privacy(make_config(dp="central", noise_multiplier=2.0, num_server_rounds=5,
                             sample_rate=0.1), population=100)
    assert not [line for line in lines if "weak guarantee" in line]


def test_budget_stop_stops_before_the_round_that_would_overspend() -> None:
    config = make_config(dp="central", noise_multiplier=1.0, sample_rate=0.1, max_epsilon=3.0,
                         num_server_rounds=500)
    ledger = PrivacyLedger(config, population=100)
    orders = np.array(RDP_ORDERS)
    per_round = compute_rdp(q=0.1, noise_multiplier=1.0, steps=1, orders=orders)
    allowed = next(t for t in range(1, 500)  # independent: the first T over budget, minus one
                   if get_privacy_spent(orders=orders, rdp=(t + 1) * per_round,
                                        delta=1e-5)[0] > 3.0)
    completed = 0
    while ledger.next_round_fits(ledger.event)[0]:
        ledger.commit_round(ledger.event)
        completed += 1
    assert completed == allowed
    assert ledger.epsilon <= 3.0 < ledger.next_round_fits(ledger.event)[1]


@pytest.mark.slow
def test_target_epsilon_is_a_cap_even_with_more_rounds_than_calibrated() -> None:
    """A run calibrated to epsilon 3 for 10 rounds, then resumed with 20: it stops at 3."""
    planned = make_config(dp="central", target_epsilon=3.0, num_server_rounds=10,
                          sample_rate=0.5)
    calibrated, ledger = plan_privacy(planned, population=20)
    extended = make_config(dp="central", target_epsilon=3.0, num_server_rounds=20,
                           sample_rate=0.5, noise_multiplier=calibrated.noise_multiplier)
    ledger = PrivacyLedger(extended, population=20)
    completed = 0
    while ledger.next_round_fits(ledger.event)[0]:
        ledger.commit_round(ledger.event)
        completed += 1
    assert completed == 10 and ledger.epsilon <= 3.0
    assert ledger.budget == (3.0, "target-epsilon")
    both = make_config(dp="central", target_epsilon=3.0, max_epsilon=5.0)
    assert PrivacyLedger(both, population=20).budget == (3.0, "target-epsilon")


def test_default_delta_is_well_below_one_over_n() -> None:
    assert default_delta(50) == 1e-5 and default_delta(1000) == 1e-5
    assert default_delta(10**4) == pytest.approx(1e-6) and default_delta(10**6) == 1e-8
    for population in (10, 100, 10**3, 10**5, 10**7):
        assert default_delta(population) * population <= 0.01


def test_no_claim_without_a_formal_mechanism() -> None:
    code_mode = make_config(dp="distributed", dp_clip_mode="code")
    assert plan_privacy(code_mode, 20)[1] is None
    batchnorm = make_config(dp="central", norm="batch", dp_allow_batchnorm=True)
    assert plan_privacy(batchnorm, 20)[1] is None
    assert plan_privacy(make_config(), 20)[1] is None


def test_the_ledger_records_the_noise_the_mechanism_added_not_the_plan() -> None:
    """A strategy wired to a weaker mechanism than its config says (sigma 0.5 instead of 2):
    the round's event comes from the mechanism that noised, so epsilon is the weaker one's."""
    config = make_config(dp="central", noise_multiplier=2.0, clip_norm=1.0, sample_rate=1.0,
                         sampling="fixed")
    weak = FedAvg(config, parameter_names=["weight"], buffer_names=[],
                  privacy=GaussianClientDP(1.0, 0.5))
    messages = list(weak.configure_train(1, ArrayRecord({"weight": torch.zeros(4)}),
                                         ConfigRecord(), FakeGrid([1, 2])))
    result = weak.train_round(1, [reply(m, {"weight": torch.zeros(4)}) for m in messages])
    assert result.event is not None and result.event.noise_multiplier == 0.5
    planned, performed = PrivacyLedger(config, 2), PrivacyLedger(config, 2)
    planned.commit_round(planned.event)
    performed.commit_round(result.event)
    assert performed.epsilon > 2 * planned.epsilon
    with pytest.raises(RuntimeError, match="without the accounting event"):
        performed.commit_round(None)


def test_the_budget_check_composes_the_wired_mechanism_not_the_plan(tmp_path) -> None:
    """A run whose plan fits max-epsilon but whose wired mechanism is weaker (sigma 0.5, not 2)
    stops before the round that would overspend, not one round after it."""
    raw = make_config(dp="central", noise_multiplier=2.0, clip_norm=1.0, sample_rate=1.0,
                      sampling="fixed", results_dir=str(tmp_path)).to_dict()
    loop = RunLoop(FakeGrid([1, 2]), raw)
    assert loop.ledger is not None
    planned_one_round = loop.ledger.accountant.epsilon_after(loop.ledger.event, loop.ledger.delta)
    loop.ledger.config = dataclasses.replace(loop.ledger.config,
                                             max_epsilon=1.5 * planned_one_round)
    assert loop.over_budget(1) is None  # the mechanism the plan describes fits
    loop.strategy.privacy = GaussianClientDP(1.0, 0.5)
    assert loop.strategy.next_event().noise_multiplier == 0.5
    assert loop.over_budget(1) is not None and "would take epsilon" in loop.over_budget(1)
