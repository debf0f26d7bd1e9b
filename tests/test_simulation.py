"""In-process simulations (no SuperLink): the whole app for two rounds, on the studies'
in-process grid, and on Flower's Ray engine where the claim is about that engine (it trains,
and a node's state lives across rounds there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import simulate

ROUND_KEYS = {"round", "test_accuracy", "test_loss", "train_loss", "num_clients", "epsilon",
              "wall_s"}


@pytest.mark.simulation
def test_fedavg_two_rounds_learns(tmp_path: Path) -> None:
    summary, rounds = simulate(tmp_path, nodes=4, engine="ray", sample_rate=1.0,
                               partitioner="iid", lr=0.3, local_steps=25)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(set(r) >= ROUND_KEYS for r in rounds)
    assert all(r["num_clients"] == 4 and r["epsilon"] is None for r in rounds)
    assert "clip_fraction" not in rounds[0]
    assert rounds[1]["train_loss"] < rounds[0]["train_loss"]
    assert rounds[1]["test_accuracy"] > 0.5  # from 0.10 at initialisation
    assert summary["config"]["local-steps"] == 25


@pytest.mark.simulation
def test_central_dp_two_rounds_reports_clipping(tmp_path: Path) -> None:
    summary, rounds = simulate(tmp_path, nodes=5, sample_rate=1.0, dp="central",
                               noise_multiplier=0.5, clip_norm=0.1)
    assert summary["status"] == "completed"
    for record in rounds:  # Poisson sampling (the default with central DP), q = 1
        assert record["population"] == 5 and record["expected_cohort"] == pytest.approx(5.0)
        assert record["num_clients"] == record["num_sampled"] == 5
        assert 0.0 <= record["clip_fraction"] <= 1.0
        assert record["mean_update_norm"] > 0
        assert record["effective_noise_multiplier"] == 0.5
    assert 0 < rounds[0]["epsilon"] < rounds[1]["epsilon"] == summary["epsilon"]
    privacy = summary["privacy"]
    assert privacy["delta"] == 1e-5 and privacy["accountant"] == "rdp"
    assert privacy["adjacency"].startswith("zero-out") and privacy["formally_dp"] is True
    assert "num_sampled" in privacy["outside_epsilon"]["rounds.jsonl"]
    assert privacy["epsilon_against_server"] is None  # central: the server sees clipped updates
    # with C = 0.1 every client's update is clipped at this learning rate
    assert rounds[0]["clip_fraction"] == 1.0
    assert privacy["units"] == ["one client's data"]
    assert summary["round_loop_s"] > 0 and summary["setup_s"] > 0
    # every key written is documented in docs/outputs.md (server_app.results), and vice versa
    # every documented telemetry key is one the run can write
    from server_app.results import ROUND_KEYS, SUMMARY_KEYS

    assert set().union(*rounds) <= set(ROUND_KEYS), set().union(*rounds) - set(ROUND_KEYS)
    assert set(summary) <= set(SUMMARY_KEYS), set(summary) - set(SUMMARY_KEYS)
    assert set(privacy["outside_epsilon"]["rounds.jsonl"]) <= set(ROUND_KEYS)


@pytest.mark.simulation
def test_a_test_seeded_run_reports_no_epsilon_anywhere(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """PLATEAU_TEST_SEED makes noise predictable: every output says null, with the reason."""
    monkeypatch.setenv("PLATEAU_TEST_SEED", "3")
    summary, rounds = simulate(tmp_path, nodes=4, sample_rate=1.0, dp="local",
                               noise_multiplier=0.5)
    assert summary["status"] == "completed"
    assert summary["epsilon"] is None and "PLATEAU_TEST_SEED" in summary["epsilon_void_reason"]
    assert summary["privacy"]["epsilon"] is None and summary["privacy"]["formally_dp"] is False
    assert summary["privacy"]["epsilon_against_server"] is None
    assert all(r["epsilon"] is None and r["epsilon_against_server"] is None
               and r["epsilon_void_reason"] for r in rounds)

@pytest.mark.simulation
@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [
        ("fedpgn", {"dp": "central", "noise_multiplier": 0.3, "clip_norm": 1.0}),
        ("fedpgn-ls", {"dp": "central", "noise_multiplier": 0.3, "clip_norm": 1.0}),
        ("fednsam", {"sharpness_every": 2, "sharpness_batch_size": 64, "sharpness_iters": 3}),
    ],
)
def test_each_algorithm_runs_two_rounds(tmp_path: Path, algorithm: str, extra: dict) -> None:
    summary, rounds = simulate(tmp_path, nodes=4, sample_rate=1.0, partitioner="iid", lr=0.3,
                               algorithm=algorithm, **extra)
    assert summary["status"] == "completed" and summary["config"]["algorithm"] == algorithm
    assert [r["num_clients"] for r in rounds] == [4, 4]
    assert all(r["global_update_norm"] > 0 and r["mean_update_norm"] > 0 for r in rounds)
    if "dp" in extra:
        assert all(r["mean_clip_error"] >= 0 and 0 <= r["clip_fraction"] <= 1 for r in rounds)
        assert summary["privacy"]["formally_dp"] is True
    else:  # with 4 clients the DP noise drowns two rounds of signal; without it, it learns
        assert rounds[0]["sharpness"] is None and rounds[1]["sharpness"] > 0
        assert rounds[1]["hessian_top_eigenvalue"] != 0
        assert rounds[1]["test_accuracy"] > 0.2  # from 0.10 at initialisation


@pytest.mark.simulation
def test_budget_stop_ends_the_run_before_overspending(tmp_path: Path) -> None:
    summary, rounds = simulate(tmp_path, nodes=5, sample_rate=0.8, dp="central",
                               noise_multiplier=1.0, max_epsilon=8.0, num_server_rounds=10)
    assert summary["status"] == "stopped"
    assert summary["stop_reason"].startswith("privacy budget: round 3 would take epsilon")
    assert len(rounds) == summary["rounds_completed"] == 2
    assert rounds[-1]["epsilon"] == summary["epsilon"] <= 8.0


@pytest.mark.simulation
def test_client_state_survives_rounds(tmp_path: Path) -> None:
    """SCAFFOLD's c_i lives in each node's Context.state: with every client in every round,
    round t's clients carry t-1 rounds of state."""
    summary, rounds = simulate(tmp_path, nodes=3, engine="ray", sample_rate=1.0,
                               algorithm="scaffold", num_server_rounds=3, partitioner="iid")
    assert summary["status"] == "completed"
    assert [r["mean_state_rounds"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["test_accuracy"] > rounds[0]["test_accuracy"]
