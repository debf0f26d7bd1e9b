"""The noise-aware global direction (direction-shrinkage='snr'): the factor is the hand-computed
positive-part James-Stein share, ~0 for a pure-noise aggregate, ~1 for a clean one, 1 without
DP, and refused up front for algorithms without a global direction."""

from __future__ import annotations

import pytest
import torch

from plateau.config import ConfigError
from server_app.build import build_strategy, load_config
from strategies.aggregation import Aggregate
from tests.helpers import make_config


def strategy_with(**overrides: object):
    config = load_config(make_config(**overrides).to_dict())
    return build_strategy(config)


def released(strategy, mean: dict) -> Aggregate:
    """The round's released mean over a public cohort of 10."""
    multiplier = (strategy.privacy.accounted_noise_multiplier(10.0)
                  if strategy.privacy is not None else None)
    return Aggregate(mean, 10.0, 100, multiplier)


def test_factor_is_the_hand_computed_signal_share() -> None:
    strategy = strategy_with(algorithm="fedcm", dp="central", noise_multiplier=0.5,
                             clip_norm=2.0, direction_shrinkage="snr")
    aggregate = {"a": torch.full((3,), 1.0), "b": torch.full((1,), 2.0)}  # |D|^2 = 7, d = 4
    variance = (0.5 * 2.0 / 10.0) ** 2
    factor = strategy.direction.shrinkage(aggregate, released(strategy, aggregate))
    assert factor == pytest.approx(1 - 4 * variance / 7)
    assert strategy.direction.metrics() == {
        "direction-shrinkage": pytest.approx(1 - 4 * variance / 7)}
    per_step = strategy.config.local_steps * strategy.learning_rate(1)
    strategy.direction.remember(aggregate, per_step, released(strategy, aggregate))
    assert torch.allclose(strategy.direction["b"],
                          torch.tensor([2.0 * (1 - 4 * variance / 7) / per_step]))


def test_pure_noise_is_dropped_and_a_clean_signal_kept() -> None:
    strategy = strategy_with(algorithm="fedpgn", dp="central", noise_multiplier=1.0,
                             clip_norm=1.0, direction_shrinkage="snr")
    std = 1.0 * 1.0 / 10.0
    generator = torch.Generator().manual_seed(0)
    noise = {"w": torch.randn(20_000, generator=generator) * std}
    assert strategy.direction.shrinkage(noise, released(strategy, noise)) < 0.03
    signal = {"w": torch.full((20_000,), 1.0)}
    assert strategy.direction.shrinkage(signal, released(strategy, signal)) > 0.98
    # the factor the strategy applies is the estimate of |signal|^2 / |D|^2 (here 1/2)
    mixed = {"w": noise["w"] + torch.full((20_000,), std)}
    factor = strategy.direction.shrinkage(mixed, released(strategy, mixed))
    assert factor == pytest.approx(0.5, abs=0.03)


def test_off_or_without_dp_the_papers_rule_is_unchanged() -> None:
    aggregate = {"w": torch.full((4,), 0.01)}
    central = strategy_with(algorithm="fedcm", dp="central")
    assert central.direction.shrinkage(aggregate, released(central, aggregate)) == 1.0
    plain = strategy_with(algorithm="fedcm", direction_shrinkage="snr")
    assert plain.direction.shrinkage(aggregate, released(plain, aggregate)) == 1.0
    assert plain.direction.metrics() == {}
    # a mechanism with no formal noise scale (the authors' code clip) is left alone
    code = strategy_with(algorithm="fedpgn", dp="distributed", dp_clip_mode="code",
                         direction_shrinkage="snr")
    assert code.direction.shrinkage(aggregate, released(code, aggregate)) == 1.0
    # an all-zero aggregate is all noise's share: factor 0, not a division by zero
    snr = strategy_with(algorithm="fedcm", dp="central", direction_shrinkage="snr")
    zero = {"w": torch.zeros(4)}
    assert snr.direction.shrinkage(zero, released(snr, zero)) == 0.0


def test_an_algorithm_without_a_global_direction_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"direction-shrinkage='snr' needs an "
                                          r"algorithm with a global direction; allowed: .*'fedcm'"):
        load_config(make_config(algorithm="fedavg", direction_shrinkage="snr").to_dict())
