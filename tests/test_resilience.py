"""Crash-safe checkpoints, resume that never undercounts epsilon, and failing clients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.app import identify, train
from plateau.config import ConfigError
from server_app.checkpoint import CHECKPOINT, LEDGER, Checkpointer, privacy_settings
from tests import helpers
from tests.helpers import make_config


def simulate(results: Path, run_name: str, client_app: ClientApp | None = None,
             nodes: int = 3, **config: object) -> dict:
    """A run on the in-process grid (tests.helpers.simulate); its summary."""
    summary, _ = helpers.simulate(results, nodes, client_app, run_name=run_name, **config)
    return summary


@pytest.mark.simulation
def test_a_stopped_run_resumed_ends_like_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DP-FedPGN with central noise: 4 rounds at once, or 2 rounds then resume to 4. With the
    test seed, each round's noise and cohort are keyed by the round (no stored generator
    state), so the models must agree; such a run claims no epsilon, but its ledger counts."""
    monkeypatch.setenv("PLATEAU_TEST_SEED", "11")
    common = {"algorithm": "fedpgn", "dp": "central", "noise_multiplier": 0.7,
              "sample_rate": 1.0, "partitioner": "iid", "local_steps": 5}
    whole = simulate(tmp_path, "whole", num_server_rounds=4, **common)
    first = simulate(tmp_path, "split", num_server_rounds=2, **common)
    assert first["rounds_completed"] == 2
    resumed = simulate(tmp_path, "split", num_server_rounds=4, resume=True, **common)
    assert resumed["status"] == "completed" and resumed["rounds_completed"] == 4
    assert resumed["epsilon"] is None and whole["epsilon"] is None
    assert "PLATEAU_TEST_SEED" in resumed["privacy"]["epsilon_void_reason"]
    ledgers = [json.loads((tmp_path / run / "checkpoint" / LEDGER).read_text())["events"]
               for run in ("split", "whole")]
    assert ledgers[0] == ledgers[1] and len(ledgers[0]) == 4
    split = torch.load(tmp_path / "split" / "checkpoint" / CHECKPOINT, weights_only=False)
    straight = torch.load(tmp_path / "whole" / "checkpoint" / CHECKPOINT, weights_only=False)
    assert split["round"] == straight["round"] == 4
    for name, tensor in straight["model"].items():
        assert torch.allclose(split["model"][name], tensor, atol=1e-6), name
    for name, tensor in straight["strategy"]["tensors"]["direction"].items():
        assert torch.allclose(split["strategy"]["tensors"]["direction"][name], tensor,
                              atol=1e-6)
    lines = (tmp_path / "split" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3, 4]


def saved_run(tmp_path: Path, **overrides: object) -> tuple[Checkpointer, object]:
    config = make_config(dp="central", run_name="r", **overrides)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save({"round": 2, "privacy": privacy_settings(config), "model": {},
                       "config": config.to_dict()})
    return checkpointer, config


def test_resume_with_a_changed_noise_multiplier_is_refused(tmp_path: Path) -> None:
    checkpointer, _ = saved_run(tmp_path, noise_multiplier=1.0)
    checkpointer.save_ledger(2, privacy_settings(make_config(dp="central", run_name="r")), [])
    changed = make_config(dp="central", run_name="r", noise_multiplier=0.5, resume=True)
    with pytest.raises(ConfigError, match=r"noise-multiplier 1\.0 -> 0\.5"):
        checkpointer.load(changed)


def test_resume_without_the_accountant_state_is_refused(tmp_path: Path) -> None:
    checkpointer, config = saved_run(tmp_path)
    assert not (tmp_path / LEDGER).exists()
    with pytest.raises(ConfigError, match="accountant's state"):
        checkpointer.load(config)


def test_a_ledger_older_than_the_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpointer, config = saved_run(tmp_path)
    checkpointer.save_ledger(1, privacy_settings(config), [])
    with pytest.raises(ConfigError, match="refusing to undercount"):
        checkpointer.load(config)


def test_a_resume_that_would_drop_the_budget_is_refused(tmp_path: Path) -> None:
    """target-epsilon is a cap: resuming without any budget would silently lift it."""
    checkpointer, config = saved_run(tmp_path, target_epsilon=3.0)
    checkpointer.save_ledger(2, privacy_settings(config), [], 2, budget=3.0)
    with pytest.raises(ConfigError, match=r"capped at epsilon=3; set target-epsilon"):
        checkpointer.load(make_config(dp="central", run_name="r", resume=True))
    raised = make_config(dp="central", run_name="r", resume=True, target_epsilon=4.0)
    _, ledger = checkpointer.load(raised)  # raising the cap explicitly is how a run goes on
    assert ledger is not None and ledger["max_participations"] == 2


def test_a_copied_checkpoint_folder_cannot_be_resumed_twice(tmp_path: Path) -> None:
    """Issue 31: copying a checkpoint folder and resuming each copy released rounds no ledger
    counted (two copies: 4 round models, each summary 3 events). The server's run ledger
    (outside the results folder) counts each run's rounds once: the second copy is refused.
    The real round loop runs against a fake grid whose nodes never reply: each DP round still
    releases its noise and is accounted, which is all the ledgers see."""
    import shutil

    common = {"dp": "central", "noise_multiplier": 1.0, "sample_rate": 1.0, "run_name": "r",
              "run_ledger": str(tmp_path / "run-ledger"), "round_timeout": 0.01,
              "max_failed_rounds": 10}
    first = run_loop_for(tmp_path, num_server_rounds=2, **common).run()
    assert first["status"] == "completed" and first["rounds_completed"] == 2
    saved = json.loads((tmp_path / "r" / "checkpoint" / LEDGER).read_text())
    assert set(saved) >= {"lineage", "max_participations"} and "participations" not in saved
    shutil.copytree(tmp_path / "r" / "checkpoint", tmp_path / "copy")
    resumed = run_loop_for(tmp_path, num_server_rounds=3, resume=True, **common).run()
    assert resumed["status"] == "completed" and resumed["rounds_completed"] == 3
    with pytest.raises(ConfigError, match="another copy of the checkpoint folder"):
        run_loop_for(tmp_path, num_server_rounds=3, resume=True,
                     **{**common, "checkpoint_dir": str(tmp_path / "copy")})
    # the launcher's up-front check refuses it too, before Flower starts
    from server_app.checkpoint import check_resume

    with pytest.raises(ConfigError, match="another copy of the checkpoint folder"):
        check_resume(make_config(results_dir=str(tmp_path), num_server_rounds=3, resume=True,
                                 **{**common, "checkpoint_dir": str(tmp_path / "copy")}))


def run_loop_for(results: Path, **config: object) -> Any:
    """The ServerApp's set-up (partition query included) against a fake grid of 3 nodes."""
    from server_app.loop import RunLoop
    from tests.helpers import FakeGrid

    raw = {"results-dir": str(results), **{k.replace("_", "-"): v for k, v in config.items()}}
    return RunLoop(FakeGrid([11, 12, 13]), raw)


def test_two_copies_running_at_once_the_second_stops_before_its_round(tmp_path: Path) -> None:
    from server_app.lineage import CopiedRun, RunLineage

    lineage = RunLineage.start(tmp_path)
    lineage.commit(0, 1)
    twin = RunLineage(tmp_path, lineage.lineage)
    twin.commit(1, 2)  # one copy goes on
    with pytest.raises(CopiedRun, match="another copy"):
        lineage.commit(1, 2)  # the other, which still believes in 1, may not
    with pytest.raises(ConfigError, match="resume refused"):
        RunLineage(tmp_path, lineage.lineage).check_resume(1)
    RunLineage(tmp_path, lineage.lineage).check_resume(3)  # a crash after its own ledger
    # a copy resumed against another run-ledger folder (another HOME, a fresh container)
    with pytest.raises(ConfigError, match="does not know this run"):
        RunLineage(tmp_path / "elsewhere", lineage.lineage).check_resume(3)
    assert json.loads(lineage.path.read_text())["events"] == 3


def test_resume_needs_a_run_name_and_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resume=true needs run-name"):
        make_config(resume=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        Checkpointer(tmp_path).load(make_config(run_name="r", resume=True))


def test_writes_are_atomic(tmp_path: Path) -> None:
    saved_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]  # no .tmp left behind


def flaky_client(fail: callable) -> ClientApp:
    """The real ClientApp's train, raising when ``fail(partition_id, round)`` says so (and
    its partition query)."""
    app = ClientApp()
    app.query()(identify)

    @app.train()
    def flaky(msg: Message, context: Context) -> Message:
        if fail(int(context.node_config["partition-id"]),
                int(msg.content["config"]["server-round"])):
            raise RuntimeError("injected client failure")
        return train(msg, context)

    return app


@pytest.mark.simulation
def test_a_client_that_raises_does_not_stop_the_run(tmp_path: Path) -> None:
    summary = simulate(tmp_path, "flaky", flaky_client(lambda pid, rnd: pid == 0 and rnd == 2),
                       num_server_rounds=3, sample_rate=1.0)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    rounds = [json.loads(x) for x in (tmp_path / "flaky" / "rounds.jsonl").read_text().splitlines()]
    assert [r["num_failed"] for r in rounds] == [0, 1, 0]
    assert [r["num_clients"] for r in rounds] == [3, 2, 3]


@pytest.mark.simulation
def test_too_many_failed_rounds_end_the_run_with_a_clear_summary(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="fewer than min-replies"):
        simulate(tmp_path, "broken", flaky_client(lambda pid, rnd: True), num_server_rounds=5,
                 max_failed_rounds=2, sample_rate=1.0)
    summary = json.loads((tmp_path / "broken" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 1
    assert "2 rounds in a row with fewer than min-replies=1" in summary["error"]
    assert "injected client failure" in summary["error"]


def test_resume_with_another_trainable_part_is_refused_before_any_tensor_loads(
        tmp_path: Path) -> None:
    text = {"dataset": "rotten-tomatoes", "model": "minilm"}
    checkpointer, _ = saved_run(tmp_path, **text, trainable="lora")
    checkpointer.save_ledger(2, privacy_settings(make_config(dp="central", run_name="r", **text,
                                                             trainable="lora")), [])
    for key, value, message in (("trainable", "head", r"trainable 'lora' -> 'head'"),
                                ("lora_rank", 4, r"lora-rank 8 -> 4")):
        changed = make_config(dp="central", run_name="r", resume=True, **text,
                              **{"trainable": "lora", key: value})
        with pytest.raises(ConfigError, match=message):
            checkpointer.load(changed)
    assert checkpointer.load(make_config(dp="central", run_name="r", resume=True, **text,
                                         trainable="lora"))[0]["round"] == 2
