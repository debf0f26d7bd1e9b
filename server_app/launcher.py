"""``make run``: validate the config, ``flwr run`` a local Ray simulation, check how it ended.

It handles the traps of ``flwr run`` on a fresh machine: state in a project-local ``FLWR_HOME``,
no runtime dependency installation (it would download a CUDA torch), a SuperLink on a free port
that is stopped by PID afterwards (``flwr run`` leaves it running detached), and an exit status
taken from ``flwr ls`` (``flwr run --stream`` exits 0 even when the run failed).

Whatever ends it (the run, ``--timeout``, SIGTERM, SIGINT, SIGHUP, or the death of ``make``, its
parent), it stops every process the run started: the SuperLink's process tree, and every process
that carries this launch's environment (Ray's daemons detach from the tree but keep it).

Usage: ``python -m server_app.launcher [--clients N] [--config "k=v ..."] [--app DIR]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from plateau.config import LOCAL_DATASET, ConfigError, ConfigValue, RunConfig, toml_value
from plateau.flower_compat import LOCAL_SUPERLINK_PORT_ENV, SUPEREXEC_POLL_ENV
from server_app.stop_request import STOP_FILE_ENV, request_stop

RUN_ID = re.compile(r"Successfully started run (\d+)")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM)
PORT_VARIABLE = LOCAL_SUPERLINK_PORT_ENV
CONFIG_VARIABLE = "PLATEAU_RUN_CONFIG"  # make run passes CONFIG here: no shell quoting on the way
# the local SuperLink's SuperExec looks for a submitted run every second by default
TASK_POLL_S = 0.1


class Stopped(BaseException):
    """The launcher was told to stop (a signal, or SIGALRM at --timeout); like
    ``KeyboardInterrupt``, no ``except Exception`` on the way may take it for an error."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the parent (``make``) dies, which ``make`` does not
    forward to its recipe: then the cleanup below runs too."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def flwr_cli() -> str:
    """The ``flwr`` next to this interpreter (the project's venv), else the one on PATH."""
    sibling = Path(sys.executable).parent / "flwr"
    return str(sibling) if sibling.exists() else "flwr"


def app_defaults(app_dir: Path) -> dict[str, ConfigValue]:
    """``[tool.flwr.app.config]`` of the app's pyproject.toml."""
    with (app_dir / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


PAIR = re.compile(r"""([^\s=]+)=('[^']*'|"[^"]*"|[^\s'"]\S*|['"]\S*)""")


def parse_overrides(text: str) -> dict[str, ConfigValue]:
    """Parse ``k=v ...`` as ``flwr run --run-config`` does (values are TOML), with an error
    that says what to write for each way a new user gets it wrong."""
    overrides: dict[str, ConfigValue] = {}
    position = 0
    for match in PAIR.finditer(text):
        stray = text[position:match.start()].strip()
        if stray:
            raise ConfigError(f"cannot read {stray!r} in the run config; expected k=v pairs "
                              "separated by spaces, strings quoted: dp='central'")
        position = match.end()
        name, value = match.groups()
        quote = value[0]
        # unclosed: no closing quote, or one borrowed from the next pair ('central run-name=')
        if quote in "'\"" and (len(value) < 2 or value[-1] != quote
                                or re.search(r"\s\S+=$", value[1:-1])):
            bare = re.split(r"\s", value.strip("'\""), maxsplit=1)[0]
            raise ConfigError(f"{name}={value.split()[0]}: the string is not closed; write "
                              f"{name}='{bare}'")
        try:
            overrides[name] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(
                f"{name}={value} is not a number, true/false or a quoted string; strings are "
                f"quoted: {name}='{value}'") from None
    stray = text[position:].strip()
    if stray:
        raise ConfigError(f"cannot read {stray!r} in the run config; expected k=v pairs "
                          "separated by spaces, strings quoted: dp='central'")
    return overrides


def stage_app(app_dir: Path, into: Path) -> Path:
    """A copy of just what the run ships: pyproject.toml and the files its FAB holds
    (``[tool.flwr.app] fab-include``). ``flwr run`` walks and resolves every file of the
    folder it is given (a virtualenv in it takes seconds here); from this copy it builds the
    same app in a fraction of a second."""
    stage = Path(tempfile.mkdtemp(prefix="app-", dir=into))
    with (app_dir / "pyproject.toml").open("rb") as handle:
        patterns = tomllib.load(handle)["tool"]["flwr"]["app"]["fab-include"]
    shutil.copy2(app_dir / "pyproject.toml", stage / "pyproject.toml")
    for pattern in patterns:
        for source in app_dir.glob(pattern):
            target = stage / source.relative_to(app_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return stage


def check_config(app_dir: Path, overrides: Mapping[str, ConfigValue],
                 clients: int) -> dict[str, ConfigValue]:
    """Validate defaults + overrides before anything starts (the ServerApp checks again),
    including what would only fail later: the dataset loads and splits among the clients (the
    split is stored, so no client computes it again), a simulation's silo files are readable
    and agree on a schema, a resume finds a checkpoint it may continue, and the metrics port is
    free. Returns what the run should add to its overrides: a simulation's class count, read
    from its silos' files here, where all of them are the user's own (deployed silos keep
    their label sets to themselves under DP, so the run declares it)."""
    from server_app.app import load_config
    from server_app.build import prepare_partitions
    from server_app.silos import check_data_dir

    config = load_config({**app_defaults(app_dir), **overrides})
    if clients < config.min_available_clients:
        raise ConfigError(f"CLIENTS={clients} is below min-available-clients="
                          f"{config.min_available_clients}: the first round would never start")
    if config.population_size and clients > config.population_size:
        raise ConfigError(f"CLIENTS={clients} is above population-size="
                          f"{config.population_size}: every client must be in the population")
    check_metrics_port(config)
    if config.resume:
        from server_app.checkpoint import check_resume

        with contextlib.chdir(app_dir):  # results-dir is relative to where the run starts
            check_resume(config)
    if config.dataset == LOCAL_DATASET:
        resolved = check_data_dir(config, clients)  # test-data too
        declared = config.num_classes or config.label_names
        return {} if declared else {"num-classes": resolved.num_classes}
    prepare_partitions(config, clients)
    return {}


def check_metrics_port(config: RunConfig) -> None:
    """The metrics endpoint's port must be free now (it is opened after the first round's
    set-up, a minute in)."""
    if not config.metrics_port:
        return
    with socket.socket() as sock:
        try:
            sock.bind((config.metrics_addr, config.metrics_port))
        except OSError as err:
            raise ConfigError(
                f"metrics-port={config.metrics_port}: {config.metrics_addr}:"
                f"{config.metrics_port} cannot be opened ({err.strerror}); another run's "
                "exporter may hold it: choose another port, or 0 for none") from None


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flwr_env(home: Path, port: int) -> dict[str, str]:
    """Environment for the flwr CLI and the SuperLink it spawns."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        PORT_VARIABLE: str(port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        SUPEREXEC_POLL_ENV: str(TASK_POLL_S),
        "RAY_DEDUP_LOGS": "0",
    }


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = (parent, cmdline)
    return table


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_superlink(port: int, grace_s: float = 10.0) -> list[int]:
    """Stop the SuperLink listening on ``port`` and every process under it; return their PIDs."""
    table = _process_table()
    roots = [pid for pid, (_, cmd) in table.items()
             if "flower-superlink" in cmd and f"--port {port}" in cmd]
    victims = set(roots)
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in table.items() if parent in victims}
        grew = not children <= victims
        victims |= children
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in victims):
            time.sleep(0.2)
        if not any(_alive(p) for p in victims):
            break
    return sorted(victims)


def launched_processes(home: Path, port: int) -> list[int]:
    """Live processes that carry this launch's FLWR_HOME and SuperLink port in their
    environment: whatever the run started, wherever it was reparented."""
    markers = {f"FLWR_HOME={home}".encode(), f"{PORT_VARIABLE}={port}".encode()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if markers <= set((entry / "environ").read_bytes().split(b"\0")):
                found.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in found if _alive(pid)]


def stop_everything(home: Path, port: int, grace_s: float = 10.0) -> None:
    """Stop the SuperLink's tree, then anything else this launch started (SIGTERM, then
    SIGKILL after ``grace_s``)."""
    stop_superlink(port, grace_s)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        victims = launched_processes(home, port)
        if not victims:
            return
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in victims):
            time.sleep(0.2)


def run_status(run_id: str, env: Mapping[str, str], cwd: Path) -> dict[str, str]:
    """The run's entry in ``flwr ls --format json`` (status and status details)."""
    out = subprocess.run(
        [flwr_cli(), "ls", "--run-id", run_id, "--format", "json"], env=dict(env), cwd=cwd,
        capture_output=True, text=True, timeout=60, check=False,
    ).stdout
    try:
        runs = json.loads(out[out.index("{"):]).get("runs", [])
    except ValueError:
        return {"status": "unknown", "status-details": out.strip()[-300:]}
    return runs[0] if runs else {"status": "unknown", "status-details": "run not listed"}


# Console lines that mislead here: Flower's notes on the default federation size (the launcher
# always sets it), Ray's notice for every worker it ends at the end of a run, and Ray's
# FutureWarning about a default it will change (with the "warnings.warn(" line after it).
NOISE = re.compile(r"default simulated SuperNodes changed from|To change federation size|"
                   r"Manually terminating ClientAppActor|RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")
WARN_CALL = re.compile(r"^\s*warnings\.warn\($")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STOP_GRACE_S = 30.0  # how long a stopped run has to write its summary before it is killed


class Relay(threading.Thread):
    """Copies the run's output to ours without the noise above (and without colour codes when
    ours is not a terminal), and notes the run id."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(daemon=True)
        self.stream, self.run_id = stream, None
        self.colour = sys.stdout.isatty()

    def run(self) -> None:
        dropped = False
        for line in self.stream:
            if self.run_id is None and (match := RUN_ID.search(line)):
                self.run_id = match.group(1)
            plain = ANSI.sub("", line)
            if NOISE.search(plain) or (dropped and WARN_CALL.match(plain)):
                dropped = True
                continue
            dropped = False
            sys.stdout.write(line if self.colour else plain)
            sys.stdout.flush()


def launch(app_dir: Path, clients: int, config: str, timeout_s: float,
           gpus_per_client: float = 0.0) -> int:
    """Run the app once in a fresh local simulation; 0 only if it finished:completed.

    A stop (a signal, or ``timeout_s``) first asks the ServerApp to stop through its stop file,
    so it ends the round loop and writes summary.json (``status: "stopped"``); whatever is still
    running ``STOP_GRACE_S`` later is stopped. ``flwr run`` gets a session of its own, so that a
    Ctrl-C in the terminal reaches the launcher alone and not Flower's processes, whose handlers
    would end them before the summary is written."""
    try:
        overrides = parse_overrides(config)
        resolved = dict(overrides)
        for name in ("data-dir", "test-data"):
            if isinstance(where := overrides.get(name), str) and where:
                # the simulation's processes start elsewhere: the path as the user meant it
                resolved[name] = str(Path(where).expanduser().resolve())
        resolved |= check_config(app_dir, resolved, clients)
        if resolved != overrides:
            config = " ".join(f"{k}={toml_value(v)}" for k, v in resolved.items())
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    home = Path(os.environ.get("FLWR_HOME", app_dir / ".flwr-home")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    stop_file = home / f"stop-{port}"
    stop_file.unlink(missing_ok=True)
    env = {**flwr_env(home, port), STOP_FILE_ENV: str(stop_file)}
    stage = stage_app(app_dir, home)
    command = [
        flwr_cli(), "run", str(stage), "--stream",
        "--federation-config",
        f"num-supernodes={clients} client-resources-num-cpus=1 "
        f"client-resources-num-gpus={gpus_per_client}",
    ]
    if config.strip():
        command += ["--run-config", config]
    started = time.monotonic()
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    signal.alarm(max(1, round(timeout_s)))
    proc, relay = None, None
    try:
        proc = subprocess.Popen(command, env=env, cwd=app_dir, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        assert proc.stdout is not None
        relay = Relay(proc.stdout)
        relay.start()
        proc.wait()
        relay.join(timeout=5)
        if relay.run_id is None:
            print("flwr run did not start a run (see above)", file=sys.stderr)
            return 1
        status = run_status(relay.run_id, env, app_dir)
    except Stopped as stop:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the stop short
        reason = (f"timeout: the run exceeded {timeout_s:.0f} s" if stop.signum == signal.SIGALRM
                  else f"stopped by {stop}")
        print(f"{reason}; asking the run to stop and write its summary, then stopping "
              "everything it started", file=sys.stderr)
        request_stop(stop_file, reason)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_GRACE_S)
        return 1 if stop.signum == signal.SIGALRM else 128 + stop.signum
    finally:
        signal.alarm(0)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_everything(home, port)
        shutil.rmtree(stage, ignore_errors=True)
        stop_file.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    elapsed = time.monotonic() - started
    details = status.get("status-details", "")
    details = "" if details in ("", "N/A") else f" ({details})"
    print(f"run {relay.run_id}: {status.get('status')} in {elapsed:.1f} s{details}")
    return 0 if status.get("status") == "finished:completed" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="20", help="simulated SuperNodes (CLIENTS)")
    parser.add_argument("--config", default=os.environ.get(CONFIG_VARIABLE, ""),
                        help=f'run-config overrides, "k=v ..." (default: ${CONFIG_VARIABLE}, '
                        "which make run sets from CONFIG untouched by the shell)")
    parser.add_argument("--app", type=Path, default=Path.cwd(), help="app directory")
    parser.add_argument("--gpus-per-client", type=float, default=0.0,
                        help="GPU fraction per simulated client (Ray), e.g. 0.25")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before giving up")
    args = parser.parse_args(argv)
    try:
        clients = int(args.clients)
    except ValueError:
        clients = 0
    if clients < 1:
        print(f"config error: CLIENTS={args.clients}: the number of simulated clients must be a "
              "whole number >= 1, e.g. make run CLIENTS=5", file=sys.stderr)
        return 2
    die_with_parent()
    return launch(args.app.resolve(), clients, args.config, args.timeout, args.gpus_per_client)


if __name__ == "__main__":
    sys.exit(main())
