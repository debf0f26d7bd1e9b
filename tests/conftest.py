"""Fixtures shared by all tests."""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict

import pytest

from plateau.flower_compat import local_grid_names

# the server's run ledger (server_app.lineage) defaults to $XDG_STATE_HOME: keep the tests' runs
# out of the user's own, in every process the tests start
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="plateau-test-state-")


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Messages can only be built inside a task; unit tests pretend to be one."""
    names = local_grid_names()  # None on a Flower that moved it: tests that build messages fail
    if names is not None:
        names.set_task_identity(1, 0, 1)


@pytest.fixture(autouse=True)
def settled_population(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' fake grids register every node at once, as the simulation engine does: they
    need not wait a network's second for SuperNodes still connecting (the settling itself is
    tested in tests/test_identity.py with nodes that arrive one by one)."""
    from strategies import population

    monkeypatch.setattr(population, "POPULATION_SETTLE_S", population.SIMULATION_SETTLE_S)


# a test's rough cost by its marker (seconds): `make test` spreads the files over two workers
# (pytest-xdist, one file at a time each), so the costliest files go first and no long one
# starts last while the other worker idles
MARKER_COST = {"e2e": 60.0, "audit": 10.0, "simulation": 5.0, "slow": 1.0}
UNMARKED_COST = 0.05


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files in decreasing total cost; the tests of a file keep their order."""
    cost: dict[object, float] = defaultdict(float)
    for item in items:
        cost[item.path] += max((MARKER_COST.get(mark.name, 0.0) for mark in item.iter_markers()),
                               default=0.0) or UNMARKED_COST
    items.sort(key=lambda item: -cost[item.path])
