"""Resume for every algorithm: N rounds straight and N/2 rounds then a resume to N give the same
model and the same server state (momentum, directions, control variates, accumulated updates,
perturbations). Forgetting a name in a strategy's ``state_attributes`` fails here.

Runs use the in-process grid of the studies (no Ray: a few seconds for all of them). Algorithms
whose clients keep state (SCAFFOLD's c_i, FedDyn's H_i, FedSMOO's H_i and mu_i) resume with the
nodes that kept it, as SuperNodes that stay up do; the server's half is what is checked here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client_app.app import app as client_app
from plateau.study.grid import LocalGrid, run_local
from server_app.checkpoint import CHECKPOINT
from strategies import STRATEGIES

CONFIG = {"dataset": "digits", "model": "linear", "partitioner": "iid", "sample-rate": 1.0,
          "local-steps": 2, "seed": 3, "max-test-examples": 200}
NODES = 3


def checkpoint(folder: Path) -> dict:
    return torch.load(folder / "checkpoint" / CHECKPOINT, weights_only=False)


def assert_same(mine: object, theirs: object, where: str) -> None:
    if isinstance(theirs, torch.Tensor):
        assert torch.equal(mine, theirs), where
    elif isinstance(theirs, dict):
        assert mine.keys() == theirs.keys(), where
        for key in theirs:
            assert_same(mine[key], theirs[key], f"{where}.{key}")
    else:
        assert mine == theirs, where


@pytest.mark.parametrize("algorithm", list(STRATEGIES))
def test_resume_continues_exactly(tmp_path: Path, algorithm: str) -> None:
    config = {**CONFIG, "algorithm": algorithm}
    straight = run_local({**config, "num-server-rounds": 4}, NODES, tmp_path / "straight")
    grid = LocalGrid(client_app, NODES, config)
    run_local({**config, "num-server-rounds": 2}, NODES, tmp_path / "split", grid=grid)
    resumed = run_local({**config, "num-server-rounds": 4, "resume": True}, NODES,
                        tmp_path / "split", grid=grid)
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3, 4]
    assert [r["test_loss"] for r in resumed.rounds] == [r["test_loss"] for r in straight.rounds]
    split, whole = checkpoint(tmp_path / "split"), checkpoint(tmp_path / "straight")
    assert split["round"] == whole["round"] == 4
    assert_same(split["model"], whole["model"], "model")
    assert_same(split["strategy"], whole["strategy"], "strategy")
    for name in STRATEGIES[algorithm].state_attributes:  # state that exists is compared
        assert name in whole["strategy"]["tensors"], name
