"""A simulation scaled out on an existing Ray cluster: a head and a worker node started with
`ray start` on loopback, each with one CPU of its own; `make run` joins it through RAY_ADDRESS.
ClientApps must run on both nodes, and the results must equal the single-machine run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_app.launcher import _alive, free_port, launch

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MARKER = "PLATEAU_TEST_RAY_CLUSTER"

NODES_OF_ACTORS = """
import json, sys
import ray
from ray._private import state  # the public state API needs Ray's dashboard
ray.init(address=sys.argv[1], logging_level="ERROR")
actors = [a for a in state.actors().values() if a["ActorClassName"] == "ClientAppActor"]
print(json.dumps({"actor_nodes": sorted({a["Address"]["NodeID"] for a in actors}),
                  "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}))
"""


def marked_processes(tag: str) -> list[int]:
    """Processes whose environment carries this test's marker (every Ray daemon it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"{MARKER}={tag}".encode() in (
                    entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in found if _alive(pid)]


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A two-node Ray cluster on loopback in a private temp dir (so no other Ray user on the
    machine finds it), torn down by killing exactly the processes it started."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited
    port = free_port()
    env = {**os.environ, MARKER: temp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", f"--temp-dir={temp}",
                        "--include-dashboard=false", *common], env=env, check=True,
                       capture_output=True, timeout=120)
        subprocess.run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", *common],
                       env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        # some of Ray's daemons outlive SIGTERM (the teardown always waited out a 15 s grace):
        # 5 s for those that do stop, then SIGKILL
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
            for pid in marked_processes(temp):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while marked_processes(temp) and time.monotonic() < deadline:
                time.sleep(0.3)
        shutil.rmtree(temp, ignore_errors=True)
        assert marked_processes(temp) == []


@pytest.mark.e2e
def test_a_run_on_a_two_node_ray_cluster_uses_both_and_matches_one_machine(
    ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    config = f"seed=3 num-server-rounds=3 results-dir='{tmp_path}'"
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    assert launch(ROOT, clients=4, config=f"{config} run-name='cluster'", timeout_s=300) == 0
    placement = json.loads(subprocess.run(
        [sys.executable, "-c", NODES_OF_ACTORS, ray_cluster], capture_output=True, text=True,
        check=True, timeout=120).stdout.strip().splitlines()[-1])
    assert len(placement["nodes"]) == 2
    assert placement["actor_nodes"] == placement["nodes"]  # a ClientApp actor on each node
    monkeypatch.delenv("RAY_ADDRESS")
    assert launch(ROOT, clients=4, config=f"{config} run-name='alone'", timeout_s=300) == 0
    records = [[{k: v for k, v in json.loads(line).items() if k != "wall_s"}
                for line in (tmp_path / run / "rounds.jsonl").read_text().splitlines()]
               for run in ("cluster", "alone")]
    assert len(records[0]) == 3 and records[0] == records[1]
    capsys.readouterr()
