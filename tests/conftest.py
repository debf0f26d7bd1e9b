"""Fixtures shared by all tests."""

from __future__ import annotations

import os
import tempfile

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
