"""The round loop's callbacks: the failure policy, saveable state, and what the checkpoint keeps."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from server_app.callbacks import FailurePolicy, Recorder, RoundOutcome, RunFailed
from server_app.checkpoint import CHECKPOINT
from strategies.screening import RoundStats
from study.grid import run_local
from tests.helpers import make_config


def outcome(accepted: int, sampled: int = 4, declined: int = 0) -> RoundOutcome:
    stats = RoundStats(sampled=sampled, accepted=accepted,
                       declined=Counter({"no-data": declined} if declined else {}))
    return RoundOutcome(server_round=1, started=0.0, stats=stats, replies=[])


def test_the_failure_policy_stops_after_max_failed_rounds_in_a_row() -> None:
    policy = FailurePolicy(make_config(min_replies=2, max_failed_rounds=2))
    policy.after_round(outcome(accepted=1))
    policy.after_round(outcome(accepted=2))  # a good round resets the count
    assert policy.failed_in_a_row == 0
    policy.after_round(outcome(accepted=0, declined=4))  # nobody willing: not a failure
    policy.after_round(outcome(accepted=1))
    with pytest.raises(RunFailed, match="2 rounds in a row"):
        policy.after_round(outcome(accepted=0))


def test_silos_whose_data_became_unusable_stop_the_run() -> None:
    """Declines for no data are not failures; declines for unusable data are: a run whose
    silos can no longer read their files stops instead of training nothing."""
    policy = FailurePolicy(make_config(max_failed_rounds=2))
    unusable = RoundOutcome(server_round=1, started=0.0, replies=[], stats=RoundStats(
        sampled=3, accepted=0, declined=Counter({"silo-data": 2, "no-data": 1})))
    policy.after_round(unusable)
    assert policy.failed_in_a_row == 1
    with pytest.raises(RunFailed, match="2 declined for unusable data"):
        policy.after_round(unusable)


def test_the_failure_count_survives_a_resume() -> None:
    config = make_config(min_replies=2, max_failed_rounds=3)
    before = FailurePolicy(config)
    before.after_round(outcome(accepted=0))
    before.after_round(outcome(accepted=1))
    after = FailurePolicy(config)
    after.load_state_dict(before.state_dict())
    with pytest.raises(RunFailed, match="3 rounds in a row"):
        after.after_round(outcome(accepted=0))


def test_a_callback_without_state_refuses_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keeps no state"):
        Recorder(recorder=None).load_state_dict({"failed_in_a_row": 1})  # type: ignore[arg-type]


def test_the_checkpoint_carries_every_callbacks_state(tmp_path: Path) -> None:
    config = {"dataset": "digits", "model": "linear", "partitioner": "iid", "sample-rate": 1.0,
              "local-steps": 1, "num-server-rounds": 2, "max-test-examples": 100}
    output = run_local(config, 2, tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoint" / CHECKPOINT, weights_only=False)
    assert list(saved["callbacks"]) == ["failure-policy", "evaluation", "model-choice",
                                        "flatness", "privacy-record", "recorder", "prometheus",
                                        "console", "checkpoint"]
    assert saved["callbacks"]["failure-policy"] == {"failed_in_a_row": 0}
    record = output.rounds[-1]
    for key in ("test_accuracy", "test_loss", "wall_s", "sharpness", "train_loss", "epsilon"):
        assert key in record, key
