"""Real `flwr run`: a local SuperLink, Ray-simulated SuperNodes, the exit status from `flwr ls`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server_app.launcher import _alive, launch

ROOT = Path(__file__).resolve().parent.parent


def leftover_processes(home: Path) -> list[int]:
    """Live processes started for this FLWR_HOME: the SuperLink, its SuperExec and the
    simulation all inherit the environment variable, so /proc/<pid>/environ names them."""
    marker = f"FLWR_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in found if _alive(pid)]


@pytest.mark.e2e
def test_a_crashed_dp_run_resumed_through_flwr_run_ends_like_a_straight_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Central DP on the test-seeded path (each round's noise and cohort keyed by the round,
    so it claims no epsilon): 4 rounds straight, or 2 rounds then `resume=true` to 4, through
    real `flwr run`s, whose nodes get new random ids every time. Every round record agrees
    (so the same seed also gives the same run: the first two rounds of both are separate runs
    of one config; tests/test_ray_cluster.py compares two runs without DP), and nothing is
    left running."""
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.setenv("PLATEAU_TEST_SEED", "7")
    common = (f"dp='central' noise-multiplier=0.5 clip-norm=1.0 sample-rate=0.6 local-steps=5 "
              f"results-dir='{tmp_path}'")
    for run, extra in (("straight", "num-server-rounds=4"), ("split", "num-server-rounds=2"),
                       ("split", "num-server-rounds=4 resume=true")):
        assert launch(ROOT, clients=5, config=f"{common} run-name='{run}' {extra}",
                      timeout_s=300) == 0
        assert leftover_processes(home) == []
    out = capsys.readouterr().out
    assert "finished:completed" in out and "resuming split after round 2" in out
    records = {run: [{k: v for k, v in json.loads(x).items() if k != "wall_s"}
                     for x in (tmp_path / run / "rounds.jsonl").read_text().splitlines()]
               for run in ("straight", "split")}
    assert [r["round"] for r in records["split"]] == [1, 2, 3, 4]
    assert records["split"] == records["straight"]
    assert all(0.0 <= r["clip_fraction"] <= 1.0 and r["epsilon"] is None
               for r in records["straight"])
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epsilon"] is None


@pytest.mark.e2e
def test_a_failed_run_makes_the_launcher_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`flwr run --stream` exits 0 on failure; the launcher must read the status and exit 1.
    A round-timeout no node can meet fails the run inside the ServerApp."""
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    config = f"round-timeout=0.001 results-dir='{tmp_path}' run-name='fail'"
    assert launch(ROOT, clients=2, config=config, timeout_s=300) == 1
    out = capsys.readouterr().out
    assert "finished:failed" in out
    assert "none of the 2 connected nodes answered the partition query" in out
    assert leftover_processes(home) == []


def test_what_can_only_fail_later_is_refused_before_flower_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dataset that cannot be loaded offline, or a split that cannot be made: one line, exit
    2, and no SuperLink is ever started."""
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("PLATEAU_DATA_DIR", str(tmp_path / "data"))
    assert launch(ROOT, clients=2, config="dataset='cifar10'", timeout_s=60) == 2
    err = capsys.readouterr().err
    assert "config error: dataset='cifar10'" in err and "work offline: 'digits'" in err
    assert launch(ROOT, clients=3000, config="partitioner='iid'", timeout_s=60) == 2
    err = capsys.readouterr().err
    assert "cannot be split among 3,000 clients: at most 1,437 clients" in err
    assert "Index" not in err and "partitioner='iid'" not in err.split(":", 3)[-1]
    assert not home.exists() or leftover_processes(home) == []


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_make_run_stops_everything_it_started(tmp_path: Path, signum: int) -> None:
    """In the middle of a run, SIGTERM goes to `make` alone (as `kill` sends it), SIGINT to its
    whole process group (as Ctrl-C sends it; a closed terminal's SIGHUP takes the same path,
    checked below without a run): the run writes summary.json (status stopped, the signal as
    the reason), then the SuperLink, the SuperExec, the simulation and Ray all go."""
    home = tmp_path / "flwr-home"
    log = tmp_path / "make.log"
    config = (f"num-server-rounds=500 local-steps=50 results-dir='{tmp_path}' "
              "run-name='interrupted'")
    with log.open("w") as out:
        make = subprocess.Popen(["make", "-s", "run", "CLIENTS=2", f"CONFIG={config}"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "FLWR_HOME": str(home)},
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "[round 1/500]" not in log.read_text():
            assert make.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        assert leftover_processes(home), "nothing running to stop"
        if signum == signal.SIGTERM:
            os.kill(make.pid, signum)
        else:
            os.killpg(make.pid, signum)
        make.wait(timeout=60)
        deadline = time.monotonic() + 60
        while leftover_processes(home) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert leftover_processes(home) == [], log.read_text()[-2000:]
        assert "stopping everything it started" in log.read_text()
        # the ServerApp was asked to stop first, and wrote its summary (issue 32: it did not)
        summary = json.loads((tmp_path / "interrupted" / "summary.json").read_text())
        assert summary["status"] == "stopped", summary
        assert signal.Signals(signum).name in summary["stop_reason"]
        assert summary["rounds_completed"] >= 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)



def test_a_closed_terminal_stops_a_run_like_ctrl_c() -> None:
    """SIGHUP (a closed terminal) is one of the launcher's stop signals and stops it as SIGINT
    does, naming itself as the reason (the run itself is stopped by SIGINT above)."""
    from server_app.launcher import STOP_SIGNALS, Stopped, _raise_stopped

    assert {signal.SIGHUP, signal.SIGINT, signal.SIGTERM} <= set(STOP_SIGNALS)
    with pytest.raises(Stopped, match="SIGHUP") as stopped:
        _raise_stopped(signal.SIGHUP, None)
    assert stopped.value.signum == signal.SIGHUP and not isinstance(stopped.value, Exception)


@pytest.mark.e2e
def test_make_run_trains_on_parquet_silos_with_record_level_dp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's command, through a real `flwr run`: three Parquet files written from a real
    dataset, data-dir relative to where make runs, record-level DP at epsilon 8."""
    from .test_local_data import write_silos

    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    write_silos(tmp_path / "silos", 3)
    monkeypatch.chdir(tmp_path)
    config = ("dataset='local' data-dir='silos' label-column='label' model='mlp' "
              "record-dp='on' record-target-epsilon=8 num-server-rounds=3 sample-rate=1.0 "
              f"local-steps=10 results-dir='{tmp_path}' run-name='silos'")
    assert launch(ROOT, clients=3, config=config, timeout_s=300) == 0
    assert "finished:completed" in capsys.readouterr().out
    summary = json.loads((tmp_path / "silos" / "summary.json").read_text())
    assert summary["evaluation"] == "federated" and 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["config"]["data-dir"] == str(tmp_path / "silos")
    assert max(summary["record_privacy"]["epsilon_per_silo"].values()) <= 8.0 + 1e-6
    assert leftover_processes(home) == []
    # README 'Your own data', step 3 as written: the exported model on a silo's file
    readme = (ROOT / "README.md").read_text()
    step3 = re.search(r"# 3\. the model it exported.*?\n(.*?)\n```", readme, re.S)
    assert step3 is not None, "README 'Your own data' lost its step 3"
    command = step3[1].replace(".venv/bin/python", sys.executable, 1).replace(
        "results/*/model", "*/model")
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.match(r"accuracy 0\.\d{6} \(\d+ of \d+ records", done.stdout), done.stdout
    assert summary["model"]["round"] == 3 and summary["model"]["formally_dp"] is True
