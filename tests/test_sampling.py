"""Client sampling: the frequencies the accountant assumes, over the whole population."""

from __future__ import annotations

import numpy as np
import pytest

from plateau.privacy.sampling import ClientSampler

NODES = list(range(101, 131))  # 30 connected nodes
SLOTS = {i: node for i, node in enumerate(NODES)}  # node 101 + i holds partition i


def frequencies(sampler: ClientSampler, population: int, rounds: int) -> tuple[np.ndarray, list]:
    counts = np.zeros(len(NODES))
    sizes = []
    for server_round in range(1, rounds + 1):
        cohort = sampler.sample(SLOTS, population, server_round)
        sizes.append(len(cohort.nodes))
        for node in cohort.nodes:
            counts[NODES.index(node)] += 1
    return counts / rounds, sizes


def test_poisson_sampling_includes_each_client_with_probability_q() -> None:
    q, rounds = 0.3, 3000
    freq, sizes = frequencies(ClientSampler("poisson", q, secret=False, seed=1), 30, rounds)
    tolerance = 5 * np.sqrt(q * (1 - q) / rounds)  # 5 binomial standard errors
    assert np.all(np.abs(freq - q) < tolerance)
    assert np.mean(sizes) == pytest.approx(q * 30, rel=0.03)
    assert np.var(sizes) > 1  # the cohort size varies (it would be constant if fixed)
    assert 0 in sizes or min(sizes) < q * 30 - 3


def test_fixed_sampling_over_a_larger_population_never_oversamples_connected_clients() -> None:
    """Population 60, 30 connected: each client is in m/N of the rounds, never m/30."""
    sampler = ClientSampler("fixed", 0.2, secret=False, seed=2)
    freq, sizes = frequencies(sampler, 60, 3000)
    assert sampler.cohort_size(60) == 12 and sampler.expected_cohort(60) == 12.0
    tolerance = 5 * np.sqrt(0.2 * 0.8 / 3000)
    assert np.all(np.abs(freq - 12 / 60) < tolerance)
    assert max(sizes) <= 12 and np.mean(sizes) == pytest.approx(6, rel=0.05)


def test_expected_cohort_is_the_public_denominator() -> None:
    assert ClientSampler("poisson", 0.25, secret=False).expected_cohort(50) == 12.5
    assert ClientSampler("fixed", 0.25, secret=False).expected_cohort(50) == 12.0
    assert ClientSampler("fixed", 0.01, secret=False).cohort_size(50) == 1


def test_more_connected_nodes_than_the_population_is_refused() -> None:
    with pytest.raises(ValueError, match="set population-size to cover every partition"):
        ClientSampler("poisson", 0.5, secret=False).sample(SLOTS, 20, 1)


def test_seeded_sampling_goes_by_partition_not_by_node_id() -> None:
    """Flower draws node ids at random each run: the same seed must pick the same partitions
    whatever ids the nodes holding them got."""
    relabelled = {slot: 9000 - node for slot, node in SLOTS.items()}
    for method in ("poisson", "fixed"):
        sampler = ClientSampler(method, 0.3, secret=False, seed=4)
        first = sampler.sample(SLOTS, 30, 2).nodes
        second = sampler.sample(relabelled, 30, 2).nodes
        assert [NODES.index(n) for n in first] == [9000 - n - 101 for n in second]


def test_seeded_sampling_is_reproducible_and_secret_sampling_is_not() -> None:
    seeded = [ClientSampler("poisson", 0.5, secret=False, seed=9).sample(SLOTS, 30, 4).nodes
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    secret = [ClientSampler("poisson", 0.5, secret=True, seed=9).sample(SLOTS, 30, 4).nodes
              for _ in range(3)]
    assert not secret[0] == secret[1] == secret[2]
