"""The audit tier: the real mechanism's empirical lower bound stays below its reported epsilon in
every placement, and every deliberately broken mechanism is flagged (an audit that cannot fail
is not an audit). Thousands of trials per world; about two minutes on 2 cores."""

from __future__ import annotations

import dataclasses
import math

import pytest

from client_app.record_audit import (
    RECORD_BROKEN_CASES,
    RECORD_REAL_CASES,
    RecordAuditSetup,
    run_record_audit,
)
from plateau.privacy.audit import (
    BROKEN_CASES,
    REAL_CASES,
    AuditResult,
    AuditSetup,
    Variant,
    epsilon_from_counts,
    format_table,
    highest_bound,
    reported_epsilon,
    run_audit,
)

pytestmark = pytest.mark.audit


def describe(result: AuditResult) -> str:
    return (f"{result.variant}: lower bound {result.epsilon_lower_bound:.2f}, reported "
            f"{result.reported_epsilon:.2f} ({result.statistic})")


@pytest.mark.parametrize(("setup", "variant"), REAL_CASES,
                         ids=[f"{s.placement}-{s.sampling}-{v.name}" for s, v in REAL_CASES])
def test_the_real_mechanism_stays_below_its_epsilon(setup: AuditSetup, variant: Variant) -> None:
    result = run_audit(setup, variant)
    assert not result.flagged, describe(result)


def test_every_real_case_could_be_flagged() -> None:
    """A case whose reported epsilon is above what its trials can ever show is a check that
    cannot fail (the antipodal case reported 9.07 against a ceiling of 6.0)."""
    for setup, variant in REAL_CASES:
        ceiling = highest_bound(setup.trials, setup.delta, setup.confidence)
        assert reported_epsilon(setup, variant.claimed_placement) < ceiling - 1.0, variant.name


@pytest.mark.parametrize(("setup", "variant"), BROKEN_CASES,
                         ids=[v.name for _, v in BROKEN_CASES])
def test_a_broken_mechanism_is_flagged(setup: AuditSetup, variant: Variant) -> None:
    result = run_audit(setup, variant)
    assert result.flagged, describe(result)
    assert "yes" in format_table([result])


def test_the_bound_from_counts_matches_clopper_pearson_by_hand() -> None:
    """Perfect separation in 1000 trials a world, each rate bounded one-sided at alpha/2:
    FPR <= 1 - (alpha/2)^(1/1000) (exact CP for 0 successes), TPR >= (alpha/2)^(1/1000);
    epsilon >= ln((TPR - delta) / FPR)."""
    alpha, n, delta = 0.05, 1000, 1e-5
    fpr = 1 - (alpha / 2) ** (1 / n)
    tpr = (alpha / 2) ** (1 / n)
    expected = math.log((tpr - delta) / fpr)
    assert epsilon_from_counts(n, n, 0, n, delta, alpha) == pytest.approx(expected, rel=1e-6)
    assert epsilon_from_counts(500, n, 500, n, delta, alpha) == 0.0


# ----- record level: one record more or less in a silo, all the silo publishes ---------------

RECORD_TRIALS = 600  # per world: perfect separation bounds epsilon at 4.4, the old claim is 2.0


@pytest.mark.parametrize("setup", RECORD_REAL_CASES, ids=[s.name for s in RECORD_REAL_CASES])
def test_a_silo_stays_below_the_record_epsilon_it_reports(setup: RecordAuditSetup) -> None:
    result = run_record_audit(dataclasses.replace(setup, trials=RECORD_TRIALS))
    assert not result.flagged, (result.epsilon_lower_bound, result.reported_epsilon,
                                result.statistic)
    # and it could have been: its epsilon is below what its trials can show
    assert result.reported_epsilon < highest_bound(RECORD_TRIALS, 0.0, setup.confidence) - 1.0


@pytest.mark.parametrize("setup", RECORD_BROKEN_CASES, ids=[s.name for s in RECORD_BROKEN_CASES])
def test_a_broken_silo_is_flagged(setup: RecordAuditSetup) -> None:
    """Among them main 755c58a's: its record count published, add/remove claimed."""
    result = run_record_audit(dataclasses.replace(setup, trials=RECORD_TRIALS))
    assert result.flagged, (result.epsilon_lower_bound, result.reported_epsilon,
                            result.statistic)
