"""A real deployment on loopback: SuperLink, two SuperNodes and process-isolated SuperExecs as
separate processes, TLS and SuperNode authentication on, two DP rounds of FedSMOO (stateful
clients: Context.state must survive between rounds on a real SuperNode), an unregistered
SuperNode rejected, every process stopped by its PID.

Each silo trains on its own Parquet file, named by its node config (``data=<path>``), with the
user's own model (``model='package.module:function'``, importable where the ServerApp and the
trainers run), and evaluates the global model on its own held-out records after each round.

Each SuperNode has a warm trainer (``python -m node.trainer``) beside it: the ClientApp
process Flower starts for every message imports no torch, enforces the node policy and hands
the work over the node's ``trainer-socket``; the trainers must have done every round's work.
The ClientApp SuperExecs are ``python -m node.superexec``: each ClientApp process is a
fork of a zygote that imported Flower's ClientApp command; no task may start cold, and the
zygotes must be gone, like every other process, once the federation is stopped.

Knobs for ``benchmarks/runtime.py --deployment-variants`` (the round with and without each
speed-up): ``PLATEAU_FORK_SERVER=0`` runs Flower's own ``flower-superexec`` for the ClientApps;
``PLATEAU_SUPERLINK_DATABASE=:flwr-in-memory:`` keeps the SuperLink's state in memory; and,
passed on to every process, ``PLATEAU_PACE_PULLS=0`` leaves Flower's pulls at their own pace and
``PLATEAU_PACK_ARRAYS=0`` sends one Array per tensor. On a Flower other than the one the
fork-server was written against, ``node.superexec`` must run as Flower's own SuperExec, with one
warning.

The commands are those of README "Deployment" (docker/generate-certs.sh, flower-superlink,
flwr supernode register, flower-supernode, flower-superexec, flwr run, flwr ls) and
deploy/README 2b."""

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

from client_app import wire
from client_app.wire import exchange
from plateau.flower_compat import pacing_enabled, superexec_internals
from server_app.launcher import _alive, free_port, stage_app

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FORK_SERVER = os.environ.get("PLATEAU_FORK_SERVER", "1") != "0"
FORKS = not isinstance(superexec_internals(), str)  # this Flower is the fork-server's
PACED = pacing_enabled()
DATABASE = os.environ.get("PLATEAU_SUPERLINK_DATABASE", "")


class Federation:
    """Processes of a local federation, each in its own FLWR_HOME, stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    def start(self, name: str, *command: str, **env: str) -> subprocess.Popen:
        home = self.workdir / f"home-{name}"
        home.mkdir(exist_ok=True)
        log = (self.workdir / f"{name}.log").open("w")
        process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                   env={**self.env, "FLWR_HOME": str(home), **env},
                                   start_new_session=True)
        self.processes.append((name, process))
        return process

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        home = self.workdir / "home-cli"
        return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout, check=False,
                              env={**self.env, "FLWR_HOME": str(home)})

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text()

    def stop(self) -> list[int]:
        """SIGTERM every process group, then SIGKILL what is left; return the PIDs."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for _, process in self.processes:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(p.poll() is None for _, p in self.processes):
                time.sleep(0.2)
        return [p.pid for _, p in self.processes]


def trainer_stats(path: Path) -> dict[str, object] | None:
    """What the trainer on ``path`` has served (its --ping answer), or None if none answers."""
    request = [wire.encode_header({"protocol": wire.PROTOCOL, "app": wire.app_digest(),
                                   "kind": "ping"}), b"", b""]
    try:
        header, _, _ = exchange(str(path), request, timeout=10)
    except wire.TrainerError:
        return None
    return header if header.get("ok") else None


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.mark.e2e
def test_tls_authenticated_deployment_runs_two_dp_rounds(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "docker" / "generate-certs.sh"), str(certs)],
                   env={**os.environ, "NODES": "3"}, check=True, capture_output=True)
    fed = Federation(tmp_path)
    link_port, node_ports = free_port(), (free_port(), free_port(), free_port())
    sockets = [tmp_path / f"trainer-{i}.sock" for i in (1, 2)]
    from .test_local_data import USER_MODEL, write_silos

    silos = write_silos(tmp_path / "silos", 3)
    (tmp_path / "usermodels").mkdir()
    (tmp_path / "usermodels" / "deployed_usermodel.py").write_text(USER_MODEL)
    user_path = {"PYTHONPATH": str(tmp_path / "usermodels")}
    started = time.monotonic()
    zygotes: list[int] = []
    try:
        fed.start("superlink", str(BIN / "flower-superlink"),
                  f"--ssl-ca-certfile={certs / 'ca.crt'}", f"--ssl-certfile={certs / 'server.pem'}",
                  f"--ssl-keyfile={certs / 'server.key'}", "--enable-supernode-auth",
                  "--isolation=process", "--host=127.0.0.1", f"--port={link_port}",
                  f"--database={DATABASE or tmp_path / 'state.db'}",
                  "--disable-runtime-dependency-installation")
        fed.start("superexec-serverapp", str(BIN / "flower-superexec"),
                  f"--root-certificates={certs / 'ca.crt'}",
                  f"--runtime-api-address=127.0.0.1:{link_port}", **user_path)
        cli_home = tmp_path / "home-cli"
        cli_home.mkdir(exist_ok=True)
        (cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
            f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{certs / "ca.crt"}"\n')
        wait_until(lambda: fed.cli("supernode", "list", "deploy").returncode == 0, 30,
                   "SuperLink reachable over TLS")
        for i in (1, 2):
            key = certs / "keys" / f"supernode-{i}.pub"
            registered = fed.cli("supernode", "register", str(key), "deploy", "--name", f"node{i}")
            assert registered.returncode == 0, registered.stdout + registered.stderr
        # one torch thread per trainer: two nodes share this machine's cores (as each simulated
        # client gets one CPU), and the SuperExecs look for new work every 0.1 s, not 1 s
        for i, path in zip((1, 2), sockets, strict=True):
            fed.start(f"trainer-{i}", sys.executable, "-m", "node.trainer",
                      f"--socket={path}", "--threads=1", **user_path)
            fed.start(f"supernode-{i}", sys.executable, "-m", "node.supernode",
                      "--poll-interval=0.1",
                      f"--root-certificates={certs / 'ca.crt'}",
                      f"--superlink=127.0.0.1:{link_port}",
                      f"--auth-supernode-private-key={certs / 'keys' / f'supernode-{i}'}",
                      "--isolation=process", "--host=127.0.0.1", f"--port={node_ports[i - 1]}",
                      f"--node-config=partition-id={i - 1} num-partitions=2 "
                      f"trainer-socket='{path}' data='{silos / f'silo-{i - 1}.parquet'}' "
                      # under DP a held-out tenth would tell the record count: node 1 holds
                      # out a file of its own, node 2's operator allows it explicitly
                      + (f"eval-data='{silos / 'silo-2.parquet'}'" if i == 1
                         else "allow-evaluation=true"))
            fed.start(f"superexec-clientapp-{i}",
                      *((sys.executable, "-m", "node.superexec") if FORK_SERVER
                        else (str(BIN / "flower-superexec"),)),
                      "--insecure",
                      f"--runtime-api-address=127.0.0.1:{node_ports[i - 1]}",
                      FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.1")
        intruder = fed.start("supernode-unregistered", str(BIN / "flower-supernode"),
                             f"--root-certificates={certs / 'ca.crt'}",
                             f"--superlink=127.0.0.1:{link_port}",
                             f"--auth-supernode-private-key={certs / 'keys' / 'supernode-3'}",
                             "--host=127.0.0.1", f"--port={node_ports[2]}",
                             "--node-config=partition-id=0 num-partitions=2")
        wait_until(lambda: fed.cli("supernode", "list", "deploy").stdout.count("online") >= 2,
                   60, "two SuperNodes online")
        wait_until(lambda: all(trainer_stats(path) for path in sockets), 120,
                   "both trainers listening")
        setup_s = time.monotonic() - started
        config = ("num-server-rounds=2 algorithm='fedsmoo' dp='central' noise-multiplier=0.8 "
                  "dataset='local' model='deployed_usermodel:build' num-classes=10 "
                  f"sample-rate=1.0 results-dir='{tmp_path / 'results'}' run-name='deployed'")
        run_started = time.monotonic()
        app = stage_app(ROOT, tmp_path)  # flwr run would walk .venv otherwise
        submitted = fed.cli("run", str(app), "deploy", "--run-config", config, "--format",
                            "json")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = str(json.loads(submitted.stdout[submitted.stdout.index("{"):])["run-id"])

        def status() -> str:
            listing = fed.cli("ls", "deploy", "--run-id", run_id, "--format", "json").stdout
            runs = json.loads(listing[listing.index("{"):]).get("runs", [])
            return runs[0]["status"] if runs else "unknown"

        wait_until(lambda: status().startswith("finished"), 300, "run finished")
        run_s = time.monotonic() - run_started
        assert status() == "finished:completed", fed.log("superexec-serverapp")[-3000:]
        rounds = [json.loads(line) for line in
                  (tmp_path / "results" / "deployed" / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(r["num_clients"] == 2 and r["epsilon"] > 0 for r in rounds)
        # FedSMOO's H_i and mu_i persisted in each SuperNode's Context.state between rounds
        assert [r["mean_state_rounds"] for r in rounds] == [0, 1]
        # each silo's own file, evaluated on its own held-out records after every round
        assert all(sorted(r["federated_silos"]) == ["0", "1"] for r in rounds)
        summary = json.loads((tmp_path / "results" / "deployed" / "summary.json").read_text())
        assert summary["config"]["input-shape"] == "64" and summary["evaluation"] == "federated"
        # client-level DP: each silo's count and label set stay on it
        assert all("records" not in schema and schema["labels"] == []
                   for schema in summary["silo_schemas"].values())
        # every node's partition query, both rounds and both evaluations were the trainers' work
        for path in sockets:
            stats = trainer_stats(path)
            assert stats is not None and stats["failed"] == 0, stats
            assert {k: stats["served"][k] for k in ("query", "train", "evaluate")} == {
                "query": 1, "train": 2, "evaluate": 2}
        wait_until(lambda: intruder.poll() is not None, 60, "unregistered SuperNode exits")
        assert intruder.returncode != 0
        assert "Failed to activate SuperNode" in fed.log("supernode-unregistered")
        assert "ref-exit-codes/305" in fed.log("supernode-unregistered")
        assert "No SuperNode found with the given public key" in fed.log("superlink")
        paced = all("looks for work every 0.1 s" in fed.log(f"supernode-{i}") for i in (1, 2))
        assert paced == PACED
        if FORK_SERVER and FORKS:
            zygotes = [int(re.search(r"warm zygote \(pid (\d+)\)",
                                     fed.log(f"superexec-clientapp-{i}"))[1]) for i in (1, 2)]
            assert all(_alive(pid) for pid in zygotes)
        for i in (1, 2):
            log = fed.log(f"superexec-clientapp-{i}")
            if FORK_SERVER and FORKS:
                assert "starts cold" not in log, log[-3000:]
                assert "launches ClientApp processes Flower's way" not in log, log[-3000:]
                assert ("ask for their message's objects every 0.1 s" in log) == PACED
            elif FORK_SERVER:  # another Flower: its own SuperExec, with one warning
                assert "launches ClientApp processes Flower's way" in log, log[-3000:]
        print(f"deployment: setup {setup_s:.1f} s, two rounds {run_s:.1f} s, "
              f"round wall times {[r['wall_s'] for r in rounds]}")
    finally:
        pids = fed.stop()
    assert not any(_alive(pid) for pid in [*pids, *zygotes])
    assert not any(path.exists() for path in sockets)  # the trainers removed their sockets
