"""Resume for every algorithm: N rounds straight and N/2 rounds then a resume to N give the same
model and the same server state (momentum, directions, control variates, accumulated updates,
perturbations): state a checkpoint left out would restart at zero and fail here.

Runs use the in-process grid of the studies (no Ray: a few seconds for all of them). The resumed
run gets fresh nodes (new ``Context``s, as a new Flower run does): algorithms whose clients keep
state (SCAFFOLD's c_i, FedDyn's and FedSpeed's H_i, FedSMOO's H_i and mu_i) continue it from the
nodes' state folder (``client_app.node_state``), so the client half is checked too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client_app.node_state import STATE_DIR_ENV, clear, load_before, save_after
from plateau.config import ConfigError
from server_app.build import build_strategy, load_config
from server_app.checkpoint import CHECKPOINT
from strategies import STRATEGIES
from study.grid import run_local

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


def straight_and_resumed(folder: Path, algorithm: str) -> tuple:
    config = {**CONFIG, "algorithm": algorithm}
    straight = run_local({**config, "num-server-rounds": 4}, NODES, folder / "straight")
    run_local({**config, "num-server-rounds": 2}, NODES, folder / "split")
    resumed = run_local({**config, "num-server-rounds": 4, "resume": True}, NODES,
                        folder / "split")
    return straight, resumed


# FedAvg in the quick tier (make test-fast), every other algorithm in make test
@pytest.mark.parametrize("algorithm", [
    a if a == "fedavg" else pytest.param(a, marks=pytest.mark.slow) for a in STRATEGIES])
def test_resume_continues_exactly(tmp_path: Path, algorithm: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "node-state"))
    straight, resumed = straight_and_resumed(tmp_path, algorithm)
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3, 4]
    assert [r["test_loss"] for r in resumed.rounds] == [r["test_loss"] for r in straight.rounds]
    split, whole = checkpoint(tmp_path / "split"), checkpoint(tmp_path / "straight")
    assert split["round"] == whole["round"] == 4
    assert_same(split["model"], whole["model"], "model")
    assert_same(split["strategy"], whole["strategy"], "strategy")
    pieces = build_strategy(load_config(CONFIG | {"algorithm": algorithm})).state_pieces()
    assert set(whole["strategy"]["tensors"]) == set(pieces)  # all the server state is compared


def test_without_a_state_folder_client_state_restarts_and_the_runs_differ(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: SCAFFOLD's nodes without their c_i give another model."""
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    straight, resumed = straight_and_resumed(tmp_path, "scaffold")
    assert resumed.rounds[3]["test_loss"] != straight.rounds[3]["test_loss"]


def test_node_state_files_replay_and_keep_the_newest_two(tmp_path: Path) -> None:
    def state(value: float) -> dict:
        return {"control": {"w": torch.full((2,), value)}}

    for server_round in (1, 3, 4):
        save_after(tmp_path, server_round, state(float(server_round)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-3.pt", "round-4.pt"]
    assert tmp_path.stat().st_mode & 0o077 == 0  # unnoised client state: the node user's only
    assert load_before(tmp_path, 1) is None
    assert float(load_before(tmp_path, 4)["control"]["w"][0]) == 3.0  # round 4 replayed
    assert float(load_before(tmp_path, 9)["control"]["w"][0]) == 4.0
    clear(tmp_path)
    assert load_before(tmp_path, 9) is None


def test_server_state_that_does_not_fit_is_refused_before_anything_is_set(
        tmp_path: Path) -> None:
    config = {**CONFIG, "algorithm": "fedavgm", "num-server-rounds": 1}
    run_local(config, NODES, tmp_path / "m")
    saved = checkpoint(tmp_path / "m")
    other = build_strategy(load_config({**config, "algorithm": "fedpgn"}))
    other.current = dict(saved["model"])
    with pytest.raises(ConfigError, match=r"holds server state \['momentum'\]; FedPGN keeps "
                                          r"\['direction'\]"):
        other.restore_state(saved["strategy"])
    same = build_strategy(load_config(config))
    same.current = dict(saved["model"])
    name = next(iter(saved["strategy"]["tensors"]["momentum"]))
    saved["strategy"]["tensors"]["momentum"][name] = torch.zeros(7)
    with pytest.raises(ConfigError, match="does not fit the model"):
        same.restore_state(saved["strategy"])
    assert same.momentum == {}
