"""``python -m node.superexec [--pull-interval S] <flower-superexec arguments>``.

Flower's SuperExec, except that each task's ``flwr-clientapp`` process is a fork of a warm
*zygote* instead of a fresh interpreter. Flower 1.42's ``SubprocessExecutor`` starts
``flwr-clientapp ...`` with ``subprocess.Popen`` for every message a SuperNode receives, and
~2 s of each start is importing Flower's ClientApp runtime. The zygote (``python -m
node.superexec --zygote``, a child of the SuperExec) imports that module once and nothing
else: no application code, no threads of its own, no gRPC channel. For each task it forks, and
the fork runs the ``flwr-clientapp`` console script's own code with the argv Flower built, the
SuperExec's environment and working directory at launch time, its stdin/stdout/stderr (or
/dev/null where Flower would suppress output) and no other file descriptor. Each task is still
a fresh process that loads the ClientApp (and its node policy) itself and exits when done;
only the import is shared. A ClientApp that starts in milliseconds asks its SuperNode for the
message before the SuperNode has pulled all of it from the SuperLink; Flower's ClientApp then
asks again after 1 s, 2 s, 4 s... The zygote paces that retry (``--pull-interval``, default
0.1 s, then every 0.4 s at most), in the ClientApp processes it forks and nowhere else.

Where this launcher is not sure to run what Flower would, it lets Flower launch:
- any task type but the ClientApp;
- on any Flower but the exact version it was written against
  (``plateau.flower_compat.FORK_SERVER_FLOWER``, through which it reaches the SuperExec's
  internals), or if Flower's ``SubprocessExecutor.launch`` does not build the command this
  module builds (a self-check at start with Flower's own code): the whole SuperExec runs
  unchanged, with a warning;
- if ``flwr-clientapp`` on the SuperExec's PATH is not the console script of this
  interpreter's Flower, or the zygote is not (yet) ready or has died;
- if the SuperExec's environment changed since the zygote started (modules read it at import):
  that task starts cold and a new zygote is started with the new environment.

Stopping the SuperExec (SIGTERM/SIGINT, or its death: the zygote reads EOF) stops the zygote,
which sends SIGTERM to its live ClientApp processes, SIGKILL after a grace period, and exits.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from logging import DEBUG, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.common import log

from node.supernode import split_poll_interval
from plateau.flower_compat import (
    SuperExecInternals,
    console_script,
    pace_clientapp_pulls,
    run_console_script,
    superexec_internals,
)

COMMAND = "flwr-clientapp"
# Plateau's packages: imported by the zygote itself, never shared with the ClientApps it forks
FIRST_PARTY = frozenset({"plateau", "strategies", "client_app", "server_app", "node", "study"})
GRACE_S = 3.0
READY_TIMEOUT_S = 10.0
LAUNCH_TIMEOUT_S = 10.0
DEFAULT_PULL_INTERVAL = 0.1


class ZygoteUnavailable(RuntimeError):
    """The zygote cannot take this launch (not ready, dead, or it did not answer)."""


# --------------------------------------------------------------------------- launcher side


class ForkServer:
    """A zygote that imported ``preload`` and forks a process running ``entry`` per launch.

    ``launch`` returns the new process's PID; ``poll`` collects the exit codes the zygote
    reports (``Popen.returncode`` style: negative for a signal) into ``exits``."""

    def __init__(self, preload: str, entry: str, env: dict[str, str] | None = None,
                 pull_interval: float | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.exits: dict[int, int] = {}
        self.children: set[int] = set()
        self._buffer = b""
        self._ready = False
        self.unpaced: str | None = None
        self._next_id = 0
        self.sock, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node.superexec", "--zygote",
                 f"--fd={theirs.fileno()}", f"--preload={preload}", f"--entry={entry}",
                 *([] if pull_interval is None else [f"--pull-interval={pull_interval}"])],
                pass_fds=[theirs.fileno()], env=self.env)
        finally:
            theirs.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def _messages(self, timeout: float) -> list[dict[str, Any]]:
        """What the zygote sent: waits up to ``timeout`` s for the first message, then takes
        whatever else is already there."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        if self.sock.fileno() < 0:
            raise ZygoteUnavailable("the zygote is stopped")
        while True:
            wait = 0.0 if out else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                return out
            data = self.sock.recv(65536)
            if not data:
                raise ZygoteUnavailable("the zygote has exited")
            self._buffer += data
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                message = json.loads(line)
                if "exit" in message:
                    self.children.discard(message["exit"])
                    self.exits[message["exit"]] = message["code"]
                elif "ready" in message:
                    self._ready = True
                    self.unpaced = message.get("unpaced")
                out.append(message)

    def poll(self) -> dict[int, int]:
        """Collect reported exits without waiting; the exits so far."""
        with contextlib.suppress(ZygoteUnavailable, OSError):
            self._messages(0)
        return self.exits

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError):
            while not self._ready and time.monotonic() < deadline and self.alive():
                self._messages(min(0.1, max(0.0, deadline - time.monotonic())))
        return self._ready

    def launch(self, argv: list[str], *, env: dict[str, str], cwd: str,
               devnull: bool = False, timeout: float = LAUNCH_TIMEOUT_S) -> int:
        """Fork a process running ``entry`` with ``sys.argv = argv``; its PID."""
        try:
            self.poll()
            if not self._ready or not self.alive():
                raise ZygoteUnavailable("the zygote is not ready")
            self._next_id += 1
            request = {"id": self._next_id, "argv": argv, "env": env, "cwd": cwd,
                       "devnull": devnull}
            self.sock.sendall(json.dumps(request).encode() + b"\n")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for message in self._messages(min(0.5, deadline - time.monotonic())):
                    if message.get("id") == self._next_id:
                        if "pid" not in message:
                            raise ZygoteUnavailable(message.get("error", "no pid"))
                        self.children.add(message["pid"])
                        return int(message["pid"])
        except OSError as err:
            raise ZygoteUnavailable(str(err)) from err
        raise ZygoteUnavailable("the zygote did not answer")

    def close(self, timeout: float = GRACE_S + 2) -> None:
        """Stop the zygote (it stops its live children first); SIGKILL if it does not exit."""
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ----------------------------------------------------------------------------- zygote side


def _reset_child(request: dict[str, Any]) -> None:
    """In the fork: the process state of ``Popen(argv, env=..., cwd=...)``'s child."""
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if request["devnull"]:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    for fd in sorted(int(name) for name in os.listdir("/proc/self/fd")):  # close_fds=True
        if fd > 2:
            with contextlib.suppress(OSError):
                os.close(fd)
    argv = list(request["argv"])
    script = shutil.which(argv[0], path=request["env"].get("PATH")) or argv[0]
    argv[0] = script.removesuffix(".exe")  # as the console script sets it
    sys.argv = argv
    sys.path[0] = os.path.dirname(os.path.realpath(script))  # a script's sys.path[0]
    # the zygote's own copies of Plateau's packages (this module and the compat module it
    # imports) must not shadow the app the ClientApp loads from its FAB: forgotten here, so
    # the fork imports them afresh from the FAB's folder, as a fresh flwr-clientapp would
    for name in [m for m in sys.modules if m.split(".")[0] in FIRST_PARTY]:
        del sys.modules[name]
    numpy = sys.modules.get("numpy")  # Python's random reseeds itself after a fork
    if numpy is not None:
        numpy.random.seed()


def _serve(sock: socket.socket, stop: list[bool], unpaced: str | None = None
           ) -> dict[str, Any] | None:
    """Fork on every request; return the request in a fork, None in the zygote at the end."""
    children: set[int] = set()
    buffer = b""

    def send(message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(json.dumps(message).encode() + b"\n")

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                return
            if pid == 0:
                return
            children.discard(pid)
            send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    send({"ready": os.getpid(), "unpaced": unpaced})
    while not stop[0]:
        reap()
        try:
            ready, _, _ = select.select([sock], [], [], 0.1)
            data = sock.recv(65536) if ready else None
        except OSError:
            data = b""
        if data == b"":
            break  # the SuperExec is gone
        buffer += data or b""
        while b"\n" in buffer and not stop[0]:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as err:
                send({"id": request["id"], "error": f"fork failed: {err}"})
                continue
            if pid == 0:
                sock.close()
                return request
            children.add(pid)
            send({"id": request["id"], "pid": pid})
    # stopping: the ClientApp processes first (SIGTERM, SIGKILL after the grace period)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + GRACE_S
        while children and time.monotonic() < deadline:
            reap()
            time.sleep(0.05)
    reap()
    return None


def zygote_main(fd: int, preload: str, entry: str, pull_interval: float | None = None) -> None:
    stop = [False]

    def request_stop(_signum: int, _frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    sock = socket.socket(fileno=fd)
    module, _, name = entry.partition(":")
    importlib.import_module(preload)
    main: Callable[[], object] = getattr(importlib.import_module(module), name)
    unpaced = None if pull_interval is None else pace_clientapp_pulls(pull_interval)
    gc.collect()
    gc.freeze()  # the forks' collections (and their exits) leave the zygote's objects alone
    request = _serve(sock, stop, unpaced)
    if request is None:
        sock.close()
        return
    _reset_child(request)
    sys.exit(main())  # as the console script does: exit code, atexit and all


# ------------------------------------------------------------------------ Flower's SuperExec


def flower_args(spec: Any, flower: SuperExecInternals) -> list[str]:
    """The command ``SubprocessExecutor.launch`` (Flower 1.42) runs for ``spec``."""
    constant = flower.constant
    args = [constant.TASK_TYPE_TO_COMMAND[spec.task_type],
            constant.TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args.extend(["--root-certificates", spec.root_certificates_path])
    if spec.parent_pid is not None:
        args.extend(["--parent-pid", str(spec.parent_pid)])
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


def sample_specs(flower: SuperExecInternals) -> list[Any]:
    """ClientApp launches with each option on and off, for the self-check."""
    return [flower.executor.ExecutionSpec(
                task_type=flower.constant.TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:1",
                token="t", insecure=insecure, root_certificates_path=certs,
                runtime_dependency_install=deps, parent_pid=parent, suppress_output=quiet,
                task_id=1)
            for insecure, certs, deps, parent, quiet in (
                (True, None, False, None, False), (False, "/ca.crt", True, 7, True),
                (False, None, False, 9, False))]


def flower_launches(spec: Any, flower: SuperExecInternals
                    ) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """What Flower's own ``SubprocessExecutor.launch(spec)`` passes to ``Popen`` (not run)."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    class Recorder:
        DEVNULL = subprocess.DEVNULL

        @staticmethod
        def Popen(*args: Any, **kwargs: Any) -> None:
            calls.append((args, kwargs))

    module = flower.subprocess_executor
    real = module.subprocess
    module.subprocess = Recorder
    try:
        module.SubprocessExecutor().launch(spec)
    finally:
        module.subprocess = real
    return calls


def mirrors_flower() -> SuperExecInternals | str:
    """Flower's SuperExec internals if this module launches what Flower's executor would
    (exactly the Flower version it was written against); else why not."""
    flower = superexec_internals()
    if isinstance(flower, str):
        return flower
    try:
        if not callable(getattr(flower.run_superexec, "get_executor", None)):
            return "this Flower's SuperExec has no get_executor"
        for spec in sample_specs(flower):
            expected = (((flower_args(spec, flower),), {"stdout": subprocess.DEVNULL,
                                                         "stderr": subprocess.DEVNULL})
                        if spec.suppress_output else ((flower_args(spec, flower),), {}))
            if flower_launches(spec, flower) != [expected]:
                return "Flower's SubprocessExecutor.launch starts another command"
    except (AttributeError, TypeError, KeyError) as err:
        return f"this Flower's SuperExec is not the expected one ({err!r})"
    return flower


def clientapp_script(path: str | None) -> str | None:
    """``flwr-clientapp`` on ``path`` if it is this interpreter's console script for the
    function this interpreter's Flower names for it, else None."""
    found, entry = shutil.which(COMMAND, path=path), console_script(COMMAND)
    if found is None or entry is None:
        return None
    try:
        lines = Path(found).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or not lines[0].startswith("#!"):
        return None
    interpreter = lines[0][2:].strip()
    same = (os.path.exists(interpreter)
            and os.path.samefile(interpreter, sys.executable))
    module, name = entry
    calls = (f"from {module} import {name}" in lines
             and f"    sys.exit({name}())" in lines)
    return found if same and calls else None


def make_executor_class(flower: SuperExecInternals,
                        pull_interval: float | None = DEFAULT_PULL_INTERVAL) -> type:
    task_types, launch_result = flower.constant.TaskType, flower.executor.LaunchResult
    entry = console_script(COMMAND)
    preload = flower.clientapp_runtime

    class ForkServerExecutor(flower.executor.SubprocessExecutor):  # type: ignore[misc, valid-type]
        """Flower's ``SubprocessExecutor``; ClientApp processes are forks of a zygote."""

        def __init__(self) -> None:
            super().__init__()
            self.server: ForkServer | None = None
            self.script: str | None = None
            self._start()

        def _start(self) -> None:
            self.script = clientapp_script(os.environ.get("PATH"))
            if self.script is None:
                log(WARNING, "%s on PATH is not this Python's Flower console script: "
                    "ClientApp processes start cold", COMMAND)
                return
            self.server = ForkServer(preload, ":".join(entry), pull_interval=pull_interval)
            log(INFO, "ClientApp processes are forks of a warm zygote (pid %d) that "
                "imported %s", self.server.pid, preload)
            self._told = False

        def _cold(self, spec: Any, why: str) -> Any:
            log(WARNING, "task %d: %s; flwr-clientapp starts cold", spec.task_id, why)
            return super().launch(spec)

        def launch(self, spec: Any) -> Any:
            if spec.task_type != task_types.CLIENT_APP:
                return super().launch(spec)
            if self.server is None:
                return super().launch(spec)
            env = dict(os.environ)
            if env != self.server.env or clientapp_script(env.get("PATH")) != self.script:
                self.server.close()
                self._start()
                return self._cold(spec, "the SuperExec's environment changed")
            if not self.server.wait_ready():
                return self._cold(spec, "the zygote is not ready")
            if not self._told:
                self._told = True
                if self.server.unpaced:
                    log(WARNING, "%s: ClientApp processes pull their message Flower's way",
                        self.server.unpaced)
                elif pull_interval is not None:
                    log(INFO, "ClientApp processes ask for their message's objects every "
                        "%g s", pull_interval)
            try:
                pid = self.server.launch(flower_args(spec, flower), env=env, cwd=os.getcwd(),
                                         devnull=spec.suppress_output)
            except ZygoteUnavailable as err:
                self.server.close()
                self._start()
                return self._cold(spec, f"the zygote failed ({err})")
            log(DEBUG, "task %d: flwr-clientapp is process %d (forked)", spec.task_id, pid)
            return launch_result.accepted()

        def reconcile(self) -> None:
            super().reconcile()
            if self.server is not None:
                before = dict(self.server.exits)
                for pid, code in self.server.poll().items():
                    if pid not in before:
                        log(DEBUG if code == 0 else WARNING,
                            "flwr-clientapp process %d exited with %d", pid, code)
                self.server.exits.clear()

        def close(self) -> None:
            if self.server is not None:
                self.server.close()
                self.server = None
            super().close()

    return ForkServerExecutor


def split_pull_interval(argv: list[str]) -> tuple[float, list[str]]:
    """``--pull-interval`` (``--pull-interval=S`` or ``--pull-interval S``) and the rest."""
    return split_poll_interval(argv, "--pull-interval", DEFAULT_PULL_INTERVAL)


def install(pull_interval: float = DEFAULT_PULL_INTERVAL) -> bool:
    """Make Flower's SuperExec use the zygote for the subprocess executor; False (and a
    warning) if this Flower's SuperExec is not the one this was written for."""
    flower = mirrors_flower()
    if isinstance(flower, str):
        log(WARNING, "%s: the SuperExec launches ClientApp processes Flower's way", flower)
        return False
    run_superexec = flower.run_superexec
    flower_get_executor = run_superexec.get_executor
    executor_class = make_executor_class(flower, pull_interval)
    subprocess_type = flower.constant.ExecutorType.SUBPROCESS

    def get_executor(executor_type: Any, executor_config: Any = None, **kwargs: Any) -> Any:
        if executor_type == subprocess_type:
            return executor_class()
        return flower_get_executor(executor_type, executor_config, **kwargs)

    run_superexec.get_executor = get_executor
    return True


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--zygote"]:
        options = dict(arg[2:].split("=", 1) for arg in args[1:])
        pull = options.get("pull-interval")
        zygote_main(int(options["fd"]), options["preload"], options["entry"],
                     None if pull is None else float(pull))
        return
    interval, args = split_pull_interval(args)
    install(interval)
    run_console_script("flower-superexec", args)


if __name__ == "__main__":
    main()
