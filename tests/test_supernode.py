"""client_app.supernode: ``--poll-interval`` is split off Flower's arguments, and pacing caps the
SuperNode loop's sleeps and the backoff of its object pulls, nothing else."""

from __future__ import annotations

import time

import pytest

from client_app import supernode
from client_app.supernode import PacedTime, pace, paced_pulls, split_poll_interval


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
    monkeypatch.setattr(supernode, "pace", lambda interval: seen.setdefault("pace", interval))
    monkeypatch.setattr(flwr.supernode.cli, "flower_supernode",
                        lambda: seen.setdefault("argv", list(supernode.sys.argv)))
    monkeypatch.setattr(supernode.sys, "argv", ["x"])
    supernode.main(["--insecure", "--poll-interval=0.3", "--superlink=h:1"])
    assert seen == {"pace": 0.3, "argv": ["flower-supernode", "--insecure", "--superlink=h:1"]}


def test_the_server_paces_its_pulls_of_reply_pieces_once() -> None:
    from flwr.superlink.grid import http_grid

    from server_app.loop import pace_reply_pulls

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
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Flower's next release may move or rename the private module the server paces: the run
    must go on at Flower's own pace, with one warning, not fail."""
    import sys

    import flwr.superlink.grid as grid_package
    from flwr.superlink.grid import http_grid

    from server_app.loop import pace_reply_pulls

    monkeypatch.delattr(http_grid, "pull_objects")  # renamed
    assert pace_reply_pulls(0.1) is False
    monkeypatch.delattr(grid_package, "http_grid")  # moved: the import itself fails
    monkeypatch.setitem(sys.modules, "flwr.superlink.grid.http_grid", None)
    assert pace_reply_pulls(0.1) is False
