"""The node's warm trainer (node.trainer) and the ClientApp handing it work: the same
release as training in the ClientApp process, the node policy enforced before anything reaches
the trainer, clear errors and an untouched Context.state for dead, hung, confused or
out-of-date trainers, one message at a time, a private socket, and nothing left behind."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client_app import wire
from client_app.app import NodeConfigError
from client_app.app import app as client_app
from client_app.wire import exchange
from tests.test_client import released, train_message

ROOT = Path(__file__).resolve().parent.parent
TRAINER = [sys.executable, "-m", "node.trainer"]


def node(socket_path: Path | str | None = None, partition: int = 0, **policy: object
         ) -> Context:
    """A SuperNode's context: partition ``partition`` of 4, handing work to ``socket_path``."""
    config: dict[str, object] = {"partition-id": partition, "num-partitions": 4, **policy}
    if socket_path is not None:
        config["trainer-socket"] = str(socket_path)
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def question(train: Message) -> Message:
    """The server's partition query carrying the run config of ``train``."""
    config = ConfigRecord({**train.content["config"], "question": "partition-id"})
    return Message(RecordDict({"config": config}), dst_node_id=7,
                   message_type=MessageType.QUERY)


def ping(path: Path) -> dict[str, object]:
    request = [wire.encode_header({"protocol": wire.PROTOCOL, "app": wire.app_digest(),
                                   "kind": "ping"}), b"", b""]
    header, _, _ = exchange(str(path), request, timeout=10)
    assert header["ok"], header
    return header


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real trainer process on a path that holds a stale socket (a crashed predecessor's):
    it takes the path over; on SIGTERM it exits cleanly and removes its socket."""
    path = tmp_path_factory.mktemp("trainer") / "t.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    process = subprocess.Popen([*TRAINER, "--socket", str(path)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                ping(path)
                break
            except wire.TrainerError:
                assert time.monotonic() < deadline, "the trainer did not start listening"
                time.sleep(0.2)
        yield path
    finally:
        process.send_signal(signal.SIGTERM)
        log = process.communicate(timeout=30)[0]
    assert process.returncode == 0, log
    assert "stopping (SIGTERM)" in log
    assert not path.exists()


@pytest.mark.parametrize(
    ("module", "absent"),
    [("client_app.app", ("torch", "client_app.compute")),  # a ClientApp process per message
     ("node.trainer", ("torch", "flwr"))],  # --ping, a probe run every few seconds
)
def test_what_runs_often_imports_little(module: str, absent: tuple[str, ...]) -> None:
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_trainer_releases_what_the_clientapp_process_would(trainer: Path) -> None:
    """FedSMOO keeps H_i and mu_i in Context.state: three rounds through the trainer give the
    same updates, metrics and state as three rounds in the ClientApp process."""
    message = smoo_round()[0]
    here, there = node(), node(trainer)
    for expected_rounds in (0, 1, 2):
        local, remote = client_app(message, here), client_app(message, there)
        assert remote.metadata.reply_to_message_id == message.metadata.message_id
        a, b = released(local), released(remote)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert dict(remote.content["metrics"]) == dict(local.content["metrics"])
        assert remote.content["metrics"]["state-rounds"] == expected_rounds
        assert here.state.keys() == there.state.keys()
        for name, record in here.state.array_records.items():
            theirs = there.state.array_records[name].to_torch_state_dict()
            assert all(torch.equal(v, theirs[k]) for k, v in record.to_torch_state_dict().items())


def test_the_partition_query_prepares_the_trainer(trainer: Path) -> None:
    before = ping(trainer)["served"]
    query = question(smoo_round()[0])
    identity = client_app(query, node(trainer, partition=2)).content["identity"]
    assert (identity["partition-id"], identity["num-partitions"]) == (2, 4)
    assert ping(trainer)["served"]["query"] == before["query"] + 1


class FakeTrainer:
    """A socket that answers like a broken trainer: ``respond`` gets the connection after the
    request was read (or nothing is read when ``read`` is False) and counts connections."""

    def __init__(self, path: Path, respond: Callable[[socket.socket], None]) -> None:
        self.path, self.respond, self.connections = path, respond, 0
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                wire.recv_parts(conn, time.monotonic() + 10)
                self.respond(conn)

    def close(self) -> None:
        self.listener.close()


def reply_with(header: object, content: bytes = b"", state: bytes = b""
               ) -> Callable[[socket.socket], None]:
    raw = header if isinstance(header, bytes) else wire.encode_header(header)  # type: ignore[arg-type]
    return lambda conn: wire.send_parts(conn, [raw, content, state], time.monotonic() + 10)


@functools.cache
def smoo_round() -> tuple[Message, RecordDict]:
    """A FedSMOO train message and a node's state after one round of it (built once)."""
    message, context = train_message(algorithm="fedsmoo"), node(None)
    client_app(message, context)
    return message, context.state


def smoo_message() -> Message:
    """A copy of the FedSMOO train message, free to change."""
    return copy.deepcopy(smoo_round()[0])


def stateful_node(path: Path | str) -> Context:
    """A node with FedSMOO state from one round in the ClientApp process, handing its work to
    ``path``."""
    context = node(path)
    context.state = copy.deepcopy(smoo_round()[1])
    return context


def metrics_only() -> bytes:
    from plateau.flower_compat import serde

    return serde().recorddict_to_bytes(RecordDict({"metrics": ConfigRecord({"x": 1})}))


@pytest.mark.parametrize(
    ("respond", "fragment"),
    [
        (lambda conn: None, "closed the connection without a whole reply"),
        (lambda conn: conn.sendall(b"\x00\x00"), "closed the connection without a whole reply"),
        (reply_with(b"not json"), "malformed reply"),
        (reply_with({"ok": True}, b"\xff\xff\xff"), "malformed reply"),
        (reply_with({"ok": True}, metrics_only()), r"malformed reply .* records \['metrics'\]"),
        (reply_with({"ok": False, "error": "disk on fire"}), "refused the train message: disk "),
        (lambda conn: conn.sendall((1 << 40).to_bytes(8, "big")), "malformed reply"),
    ],
)
def test_a_bad_reply_fails_clearly_and_leaves_the_state_alone(
        tmp_path: Path, respond: Callable[[socket.socket], None], fragment: str) -> None:
    fake = FakeTrainer(tmp_path / "t.sock", respond)
    context = stateful_node(fake.path)
    state = copy.deepcopy(context.state)
    try:
        with pytest.raises(wire.TrainerError, match=fragment):
            client_app(smoo_message(), context)
    finally:
        fake.close()
    assert fake.connections == 1
    assert context.state == state


def test_a_hung_trainer_fails_at_the_round_timeout(tmp_path: Path) -> None:
    release = threading.Event()
    fake = FakeTrainer(tmp_path / "t.sock", lambda conn: release.wait(30))
    context = stateful_node(fake.path)
    state = copy.deepcopy(context.state)
    message = smoo_message()
    message.content["config"]["round-timeout"] = 1.5
    started = time.monotonic()
    try:
        with pytest.raises(wire.TrainerError, match=r"no reply from the trainer .* within 1.5 s"):
            client_app(message, context)
    finally:
        release.set()
        fake.close()
    assert time.monotonic() - started < 10
    assert context.state == state


def test_no_trainer_fails_clearly_and_leaves_the_state_alone(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # a socket file nothing listens on: a trainer that died
    (tmp_path / "plain").write_text("not a socket")
    for path, fragment in [(stale, "nothing listens on trainer-socket="),
                           (tmp_path / "missing.sock", "does not exist"),
                           (tmp_path / "plain", "is not a socket"),
                           ("relative.sock", "must be an absolute path")]:
        context = stateful_node(path)
        state = copy.deepcopy(context.state)
        with pytest.raises(wire.TrainerError, match=fragment):
            client_app(smoo_message(), context)
        assert context.state == state


@pytest.mark.parametrize(
    ("run", "policy"),
    [({"dp": "central"}, {"require-dp": "local"}),
     ({"dp": "local", "noise_multiplier": 0.5}, {"min-noise-multiplier": 1.0}),
     ({"dp": "local", "clip_norm": 5.0}, {"max-clip-norm": 1.0})],
)
def test_the_node_policy_is_enforced_before_anything_reaches_the_trainer(
        tmp_path: Path, run: dict, policy: dict) -> None:
    fake = FakeTrainer(tmp_path / "t.sock", reply_with({"ok": False, "error": "reached"}))
    message = train_message(**run)
    try:
        with pytest.raises(NodeConfigError):
            client_app(message, node(fake.path, **policy))
        identity = client_app(question(message), node(fake.path, **policy)).content["identity"]
        assert identity["partition-id"] == 0  # answered, but no warm-up handed over
    finally:
        fake.close()
    assert fake.connections == 0


def test_a_failure_in_the_trainer_comes_back_as_the_reason(trainer: Path) -> None:
    message = smoo_message()
    message.content["config"]["local-rule"] = "no-such-rule"
    context = stateful_node(trainer)
    state = copy.deepcopy(context.state)
    failed = ping(trainer)["failed"]
    with pytest.raises(wire.TrainerError, match="ValueError: unknown local rule 'no-such-rule'"):
        client_app(message, context)
    assert context.state == state
    assert ping(trainer)["failed"] == failed + 1


def test_the_trainer_refuses_another_app_version(trainer: Path, tmp_path: Path) -> None:
    """The digest follows the code: one changed line in a copy of the app changes it, in the
    privacy package or in a local rule (strategies/, which the digest once left out), and the
    trainer refuses a message carrying another digest."""
    for package in ("client_app", "plateau", "strategies"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    code = "from client_app.wire import app_digest; print(app_digest())"

    def digest() -> str:
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, text=True,
                              capture_output=True, env={**os.environ, "PYTHONPATH": str(tmp_path)}
                              ).stdout.strip()

    assert digest() == wire.app_digest()
    with (tmp_path / "strategies" / "fedavg.py").open("a") as handle:
        handle.write("\n# another local rule\n")
    rule_changed = digest()
    assert rule_changed != wire.app_digest()
    with (tmp_path / "plateau" / "privacy" / "mechanism.py").open("a") as handle:
        handle.write("\n# another version\n")
    other = digest()
    assert other not in (wire.app_digest(), rule_changed)
    request = [wire.encode_header({"protocol": wire.PROTOCOL, "app": other, "kind": "train"}),
               b"", b""]
    header, _, _ = exchange(str(trainer), request, timeout=10)
    assert not header["ok"]
    assert f"comes from app code {other}" in str(header["error"])
    assert "restart the trainer from the same app version" in str(header["error"])


def test_concurrent_messages_are_each_trained_as_alone(trainer: Path) -> None:
    """Four SuperNodes share one trainer and send at once: every reply is what the node would
    have released on its own (the work runs one message at a time on the shared model)."""
    message = train_message(algorithm="scaffold")
    expected = [released(client_app(message, node(None, partition=p))) for p in range(4)]
    got: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def send(partition: int) -> None:
        try:
            got[partition] = released(client_app(message, node(trainer, partition=partition)))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=send, args=(p,)) for p in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    for partition, update in enumerate(expected):
        assert all(torch.equal(update[k], got[partition][k]) for k in update)


@pytest.mark.slow
def test_the_socket_is_private_and_the_path_is_not_taken_twice(trainer: Path,
                                                               tmp_path: Path) -> None:
    assert stat.S_IMODE(os.stat(trainer).st_mode) == 0o600
    second = subprocess.run([*TRAINER, "--socket", str(trainer)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert second.returncode != 0 and "a trainer already listens on" in second.stderr
    ping(trainer)  # the first one is unharmed
    plain = tmp_path / "plain"
    plain.write_text("precious")
    refused = subprocess.run([*TRAINER, "--socket", str(plain)], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, check=False)
    assert refused.returncode != 0 and "is not a socket" in refused.stderr
    assert plain.read_text() == "precious"


def test_ping_is_a_readiness_probe(trainer: Path, tmp_path: Path) -> None:
    ok = subprocess.run([*TRAINER, "--socket", str(trainer), "--ping"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 0 and '"ok": true' in ok.stdout
    down = subprocess.run([*TRAINER, "--socket", str(tmp_path / "none.sock"), "--ping"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert down.returncode == 1 and "does not exist" in down.stderr


@pytest.mark.slow
def test_a_stop_signal_amid_connections_still_stops_the_trainer(tmp_path: Path) -> None:
    """SIGTERM while connections keep arriving (a probe, ClientApps): a signal that lands while
    the server starts a connection's thread must still stop it, and the socket must go."""
    path = tmp_path / "busy.sock"
    process = subprocess.Popen([*TRAINER, "--socket", str(path)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = threading.Event()

    def knock() -> None:
        while not done.is_set():
            with socket.socket(socket.AF_UNIX) as client, contextlib.suppress(OSError):
                client.connect(str(path))

    try:
        deadline = time.monotonic() + 120
        while not path.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        knockers = [threading.Thread(target=knock) for _ in range(8)]
        for knocker in knockers:
            knocker.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        log = process.communicate(timeout=8)[0]
    finally:
        done.set()
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, log[-2000:]
    assert "stopping (SIGTERM)" in log and not path.exists()
