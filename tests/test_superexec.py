"""node.superexec: every launch is a fresh process forked from the zygote, with the
argv, environment, working directory and output Flower's SubprocessExecutor would give it;
exit codes come back; stopping the SuperExec (or its death) leaves no zygote and no task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from node import superexec
from node.superexec import ForkServer, ZygoteUnavailable
from plateau.flower_compat import superexec_internals
from server_app.launcher import _alive

FLOWER = superexec_internals()  # the SuperExec's internals, reached through the compat module
on_its_flower = pytest.mark.skipif(isinstance(FLOWER, str), reason=str(FLOWER))

PROBE = textwrap.dedent('''
    import json, os, signal, sys, time

    launches = 0

    def main():
        global launches
        launches += 1  # the zygote's copy stays 0: every launch starts from it
        kind, out = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
        if kind == "report":
            fds = sorted(os.listdir("/proc/self/fd"))
            with open(out, "w") as handle:
                json.dump({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv,
                           "cwd": os.getcwd(), "mark": os.environ.get("PROBE_MARK"),
                           "launches": launches, "fds": fds,
                           "first_party": sorted(m for m in sys.modules if m.split(".")[0] in
                                                 ("plateau", "node", "client_app", "strategies",
                                                  "server_app", "study")),
                           "sigterm": str(signal.getsignal(signal.SIGTERM))}, handle)
        elif kind == "print":
            print("probe says", out, flush=True)
        elif kind == "exit":
            return int(out)
        elif kind == "raise":
            raise RuntimeError("probe failed")
        elif kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "sleep":
            open(out + ".tmp", "w").write(str(os.getpid()))
            os.rename(out + ".tmp", out)
            time.sleep(600)
        return None
''')


@pytest.fixture
def server(tmp_path: Path):
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    fork_server = ForkServer(preload="json", entry="probe:main", env=env)
    assert fork_server.wait_ready(30)
    yield fork_server
    fork_server.close()


def wait_exit(server: ForkServer, pid: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid in server.poll():
            return server.exits[pid]
        time.sleep(0.02)
    raise TimeoutError(pid)


def test_each_launch_is_a_fresh_fork_with_popens_process_state(server: ForkServer,
                                                               tmp_path: Path) -> None:
    env = {**server.env, "PROBE_MARK": "m1"}
    reports = []
    for i in range(2):
        out = tmp_path / f"report-{i}.json"
        pid = server.launch(["probe", "report", str(out)], env=env, cwd=str(tmp_path))
        assert wait_exit(server, pid) == 0
        reports.append(json.loads(out.read_text()))
    first, second = reports
    assert first["pid"] != second["pid"] and server.pid not in (first["pid"], second["pid"])
    assert first["ppid"] == second["ppid"] == server.pid
    assert first["launches"] == second["launches"] == 1
    assert first["argv"][1:] == ["report", str(tmp_path / "report-0.json")]
    assert first["cwd"] == str(tmp_path) and first["mark"] == "m1"
    assert first["sigterm"] == str(signal.SIG_DFL)
    assert len(first["fds"]) == 4  # stdin, stdout, stderr, and the listing itself
    # the zygote imported node.superexec and plateau.flower_compat; the fork imports the app's
    # own copies from its FAB, so none of the zygote's may be left in its module table
    assert first["first_party"] == []


@pytest.mark.parametrize(("argv", "code"), [
    (["probe", "exit", "0"], 0), (["probe", "exit", "3"], 3), (["probe", "raise"], 1),
    (["probe", "kill"], -signal.SIGKILL)])
def test_exit_codes_come_back_as_popen_returncodes(server: ForkServer, tmp_path: Path,
                                                   argv: list[str], code: int) -> None:
    pid = server.launch(argv, env=server.env, cwd=str(tmp_path))
    assert wait_exit(server, pid) == code
    assert server.alive()  # a failing task does not take the zygote down


def test_output_is_the_superexecs_or_devnull(server: ForkServer, tmp_path: Path) -> None:
    script = textwrap.dedent('''
        import os
        from node.superexec import ForkServer
        server = ForkServer(preload="json", entry="probe:main")
        assert server.wait_ready(30)
        for word, devnull in (("loud", False), ("quiet", True)):
            pid = server.launch(["probe", "print", word], env=server.env, cwd=os.getcwd(),
                                devnull=devnull)
            while pid not in server.poll():
                pass
        server.close()
    ''')
    done = subprocess.run([superexec.sys.executable, "-c", script], env=server.env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    assert "probe says loud" in done.stdout and "quiet" not in done.stdout + done.stderr


def sleeping_task(server: ForkServer, tmp_path: Path) -> int:
    pid_file = tmp_path / "sleeper.pid"
    pid = server.launch(["probe", "sleep", str(pid_file)], env=server.env, cwd=str(tmp_path))
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert int(pid_file.read_text()) == pid and _alive(pid)
    return pid


def test_stop_leaves_no_zygote_and_no_task(server: ForkServer, tmp_path: Path) -> None:
    task = sleeping_task(server, tmp_path)
    server.close()
    assert not _alive(server.pid) and not _alive(task)
    assert server.process.returncode == 0
    with pytest.raises(ZygoteUnavailable):
        server.launch(["probe", "exit", "0"], env=server.env, cwd=str(tmp_path))


def test_zygote_and_tasks_go_when_the_superexec_dies(server: ForkServer,
                                                     tmp_path: Path) -> None:
    task = sleeping_task(server, tmp_path)
    server.sock.close()  # what the zygote sees when the SuperExec is killed
    server.process.wait(timeout=20)
    deadline = time.monotonic() + 10
    while _alive(task) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(task)


def test_zygote_sigterm_stops_its_tasks(server: ForkServer, tmp_path: Path) -> None:
    task = sleeping_task(server, tmp_path)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=20) == 0
    assert not _alive(task)


# ------------------------------------------------------------------ Flower's SuperExec


@on_its_flower
def test_the_launcher_runs_the_command_flowers_executor_runs() -> None:
    flower = superexec.mirrors_flower()
    assert flower == FLOWER
    for spec in superexec.sample_specs(flower):
        ((args,), kwargs), = superexec.flower_launches(spec, flower)
        assert args == superexec.flower_args(spec, flower)
        assert kwargs == ({"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
                          if spec.suppress_output else {})


@on_its_flower
def test_another_flower_executor_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    run_superexec, subprocess_executor = FLOWER.run_superexec, FLOWER.subprocess_executor

    def launch(self, spec):  # a Flower that starts the task differently
        subprocess_executor.subprocess.Popen(["flwr-clientapp", "--other"])

    monkeypatch.setattr(subprocess_executor.SubprocessExecutor, "launch", launch)
    monkeypatch.setattr(run_superexec, "get_executor", run_superexec.get_executor)
    flowers = run_superexec.get_executor
    assert "another command" in superexec.mirrors_flower()
    assert not superexec.install()
    assert run_superexec.get_executor is flowers


def test_clientapp_script_is_this_pythons(tmp_path: Path) -> None:
    bin_dir = Path(superexec.sys.executable).parent
    assert superexec.clientapp_script(str(bin_dir)) == str(bin_dir / "flwr-clientapp")
    fake = tmp_path / "flwr-clientapp"
    fake.write_text("#!/bin/sh\necho not flower\n")
    fake.chmod(0o755)
    assert superexec.clientapp_script(str(tmp_path)) is None
    assert superexec.clientapp_script(str(tmp_path / "nothing")) is None


@on_its_flower
def test_other_task_types_are_launched_by_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    task_type, subprocess_executor = FLOWER.constant.TaskType, FLOWER.subprocess_executor
    calls = []

    class Recorder:
        DEVNULL = subprocess.DEVNULL

        @staticmethod
        def Popen(*args, **kwargs):
            calls.append(args)

    monkeypatch.setattr(subprocess_executor, "subprocess", Recorder)
    monkeypatch.setenv("PATH", str(Path(superexec.sys.executable).parent) + os.pathsep
                       + os.environ["PATH"])
    executor = superexec.make_executor_class(FLOWER, None)()
    try:
        spec = FLOWER.executor.ExecutionSpec(
            task_type=task_type.SERVER_APP, runtime_api_address="127.0.0.1:1", token="t",
            insecure=True, root_certificates_path=None, runtime_dependency_install=False,
            parent_pid=None, suppress_output=False, task_id=1)
        assert executor.launch(spec).status == "accepted"
        assert calls == [(superexec.flower_args(spec, FLOWER),)]
        zygote = executor.server.pid
    finally:
        executor.close()
    assert not _alive(zygote)


def test_pull_interval_is_split_off() -> None:
    assert superexec.split_pull_interval(["--insecure"]) == (0.1, ["--insecure"])
    assert superexec.split_pull_interval(["--pull-interval", "0.3", "--insecure"]) == (
        0.3, ["--insecure"])
