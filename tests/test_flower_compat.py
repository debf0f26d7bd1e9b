"""plateau.flower_compat, the one module that reaches Flower's internals: each accessor works on
this Flower and falls back (False/None and one warning, nothing changed) where Flower moved
what it needs. node.supernode: ``--poll-interval`` is split off Flower's arguments, and pacing
caps the SuperNode loop's sleeps and the backoff of its object pulls, nothing else."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest

from node import supernode
from node.supernode import split_poll_interval
from plateau import flower_compat
from plateau.flower_compat import PacedTime, paced_pulls
from plateau.flower_compat import pace_serverapp_pulls as pace_reply_pulls
from plateau.flower_compat import pace_supernode_loop as pace


@pytest.mark.parametrize(("argv", "interval", "rest"), [
    ([], 0.2, []),
    (["--poll-interval=0.1", "--insecure"], 0.1, ["--insecure"]),
    (["--insecure", "--poll-interval", "0.5", "--port=1"], 0.5, ["--insecure", "--port=1"]),
    (["--poll-interval=1", "--poll-interval=3"], 3.0, []),
    (["--node-config=poll-interval=9"], 0.2, ["--node-config=poll-interval=9"]),
])
def test_poll_interval_is_split_off(argv: list[str], interval: float, rest: list[str]) -> None:
    assert split_poll_interval(argv) == (interval, rest)


@pytest.mark.parametrize("value", ["0", "-1", "3.5", "soon", "nan"])
def test_poll_interval_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(SystemExit, match="--poll-interval must be"):
        split_poll_interval([f"--poll-interval={value}"])
    with pytest.raises(SystemExit, match="--poll-interval must be"):
        split_poll_interval(["--poll-interval"])  # no value


def test_other_names_and_defaults() -> None:
    assert split_poll_interval(["--pull-interval=0.3", "-x"], "--pull-interval", 0.1) == (
        0.3, ["-x"])
    assert split_poll_interval(["-x"], "--pull-interval", 0.1) == (0.1, ["-x"])


def test_paced_time_caps_sleeps_only() -> None:
    paced = PacedTime(0.05)
    started = time.monotonic()
    paced.sleep(3)
    assert time.monotonic() - started < 1
    assert paced.monotonic is time.monotonic and paced.time is time.time


def test_paced_pulls_shorten_the_backoff_unless_told() -> None:
    calls = []

    def pull(ids, fn, *, initial_backoff: float = 1, backoff_cap: float = 10) -> str:
        calls.append((initial_backoff, backoff_cap))
        return "pulled"

    paced = paced_pulls(pull, 0.1)
    assert paced is not None and paced.__name__ == "pull"
    assert paced([], None) == "pulled"
    assert paced([], None, initial_backoff=2) == "pulled"
    assert calls == [(0.1, pytest.approx(0.4)), (2, pytest.approx(0.4))]
    # never slower than Flower's own defaults
    paced = paced_pulls(pull, 3)
    assert paced is not None and paced([], None) == "pulled"
    assert calls[-1] == (1, 10)
    assert paced_pulls(lambda ids, fn: None, 0.1) is None  # not a pull with a backoff


def test_pace_patches_flowers_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    flowers_pull = loop.pull_objects
    assert pace(0.1)
    assert isinstance(loop.time, PacedTime) and loop.time.interval == 0.1
    assert loop.pull_objects.__wrapped__ is flowers_pull
    assert loop.pull_objects.paced_interval == 0.1


def test_pace_leaves_another_loop_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "pull_objects", lambda ids, fn: {})  # no backoff to pace
    assert not pace(0.1)
    assert loop.time is time


def test_main_passes_the_rest_to_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supernode.cli

    seen = {}
    monkeypatch.setattr(supernode, "pace_supernode_loop",
                        lambda interval: seen.setdefault("pace", interval))
    monkeypatch.setattr(flwr.supernode.cli, "flower_supernode",
                        lambda: seen.setdefault("argv", list(flower_compat.sys.argv)))
    monkeypatch.setattr(flower_compat.sys, "argv", ["x"])
    supernode.main(["--insecure", "--poll-interval=0.3", "--superlink=h:1"])
    assert seen == {"pace": 0.3, "argv": ["flower-supernode", "--insecure", "--superlink=h:1"]}


def test_the_server_paces_its_pulls_of_reply_pieces_once() -> None:
    from flwr.superlink.grid import http_grid

    original = http_grid.pull_objects  # an in-process ServerApp of another test may have paced it
    flowers = getattr(original, "__wrapped__", original)
    http_grid.pull_objects = flowers
    try:
        assert pace_reply_pulls(0.1) and pace_reply_pulls(0.1)
        assert http_grid.pull_objects.paced_interval == 0.1
        assert http_grid.pull_objects.__wrapped__ is flowers  # wrapped once, not twice
    finally:
        http_grid.pull_objects = original


def test_a_flower_without_the_private_pull_runs_at_its_own_pace(
        monkeypatch: pytest.MonkeyPatch, fresh_warnings: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """Flower's next release may move or rename the private module the server paces: the run
    must go on at Flower's own pace, with one warning, not fail."""
    import flwr.superlink.grid as grid_package
    from flwr.superlink.grid import http_grid

    monkeypatch.delattr(http_grid, "pull_objects")  # renamed
    assert pace_reply_pulls(0.1) is False
    monkeypatch.delattr(grid_package, "http_grid")  # moved: the import itself fails
    monkeypatch.setitem(sys.modules, "flwr.superlink.grid.http_grid", None)
    assert pace_reply_pulls(0.1) is False
    warnings = [r for r in caplog.records if "Flower's own pace" in r.getMessage()]
    assert len(warnings) == 1  # one warning per process, not one per round


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(flower_compat, "_WARNED", set())
    flower_compat.serde.cache_clear()
    flower_compat.local_grid_names.cache_clear()
    yield
    flower_compat.serde.cache_clear()
    flower_compat.local_grid_names.cache_clear()


def test_this_flower_has_everything_the_compat_module_reaches() -> None:
    """On the Flower pyproject.toml pins, every accessor finds its internal: a Flower upgrade
    that moves one fails here first, by name."""
    assert flower_compat.serde() is not None
    assert flower_compat.local_grid_names() is not None
    exact = flower_compat.flower_version() == flower_compat.FORK_SERVER_FLOWER
    assert isinstance(flower_compat.superexec_internals(), str) is not exact
    assert flower_compat.console_script("flwr-clientapp") is not None
    assert flower_compat.console_script("no-such-script") is None


def test_records_and_contexts_round_trip_through_flowers_serialisation() -> None:
    from flwr.app import ConfigRecord, Context, RecordDict

    serde = flower_compat.serde()
    record = RecordDict({"config": ConfigRecord({"a": 1, "b": "x"})})
    assert serde.recorddict_from_bytes(serde.recorddict_to_bytes(record)) == record
    context = Context(run_id=3, node_id=4, node_config={"partition-id": 1}, state=record,
                      run_config={"lr": 0.1})
    back = serde.context_from_bytes(serde.context_to_bytes(context))
    assert (back.run_id, back.node_id, dict(back.node_config), back.state, dict(back.run_config)
            ) == (3, 4, {"partition-id": 1}, record, {"lr": 0.1})


def test_a_flower_without_the_serialisation_refuses_work_meant_for_the_trainer(
        monkeypatch: pytest.MonkeyPatch, fresh_warnings: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """Flower moves its serde module: a node with a trainer refuses the work (training in the
    ClientApp process would bypass the trainer's data and the silo's record ledger), with one
    warning; a node without one trains as before; the trainer refuses to start."""
    from client_app.handoff import trainer_socket
    from client_app.wire import TrainerError
    from node.service import TrainerServer

    assert trainer_socket({"trainer-socket": "/run/t.sock"}) == "/run/t.sock"
    flower_compat.serde.cache_clear()
    monkeypatch.setitem(sys.modules, "flwr.common.serde", None)
    for _ in range(2):
        with pytest.raises(TrainerError, match="work is refused"):
            trainer_socket({"trainer-socket": "/run/t.sock"})
    assert trainer_socket({}) is None
    assert sum("warm trainer cannot be used" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(SystemExit, match="without trainer-socket"):
        TrainerServer("/nonexistent/t.sock")


def test_a_flower_without_the_grid_identities_has_no_local_grid(
        monkeypatch: pytest.MonkeyPatch, fresh_warnings: None) -> None:
    from study.grid import LocalGrid

    monkeypatch.setitem(sys.modules, "flwr.supercore.task_identity", None)
    assert flower_compat.local_grid_names() is None
    with pytest.raises(RuntimeError, match="Flower's simulation"):
        LocalGrid(None, 2, {})


def test_the_fork_server_needs_the_exact_flower_it_was_written_against(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from node import superexec

    monkeypatch.setattr(flower_compat, "flower_version", lambda: "1.43.0.dev20261026")
    why = flower_compat.superexec_internals()
    assert isinstance(why, str) and "1.42.0" in why and "1.43.0.dev20261026" in why
    assert not superexec.install()  # the SuperExec runs as Flower's own


def test_a_moved_clientapp_runtime_leaves_the_clientapps_pull_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flwr.supernode.runtime.run_clientapp", None)
    assert "no flwr.supernode.runtime.run_clientapp" in flower_compat.pace_clientapp_pulls(0.1)


def test_the_zygote_paces_the_clientapps_message_pull(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.runtime import run_clientapp

    flowers = run_clientapp.pull_and_inflate_object_from_tree
    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree", flowers)
    assert flower_compat.pace_clientapp_pulls(0.1) is None
    assert run_clientapp.pull_and_inflate_object_from_tree.__wrapped__ is flowers
    assert run_clientapp.pull_and_inflate_object_from_tree.paced_interval == 0.1


def test_pacing_turned_off_leaves_every_pull_at_flowers_pace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks' PLATEAU_PACE_PULLS=0: nothing of Flower's is replaced."""
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.runtime import run_clientapp

    monkeypatch.setenv(flower_compat.PACE_ENV, "0")
    for module, name in ((http_grid, "pull_objects"), (loop, "pull_objects"), (loop, "time"),
                         (run_clientapp, "pull_and_inflate_object_from_tree")):
        monkeypatch.setattr(module, name, getattr(module, name))
    before = (http_grid.pull_objects, loop.pull_objects, loop.time,
              run_clientapp.pull_and_inflate_object_from_tree)
    assert pace_reply_pulls(0.1) is False and pace(0.1) is False
    assert "PLATEAU_PACE_PULLS=0" in flower_compat.pace_clientapp_pulls(0.1)
    assert (http_grid.pull_objects, loop.pull_objects, loop.time,
            run_clientapp.pull_and_inflate_object_from_tree) == before
