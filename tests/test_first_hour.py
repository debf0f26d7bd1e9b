"""The first hour of a new user (issue 32): every mistake they made, typed into `make run` as
they typed it, fails before Flower starts, in one line naming the key and the fix, within 10 s,
with exit code 2, no traceback, and nothing left in the results folder. The cases live in
benchmarks/first_hour.py, which prints the same as a table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def first_hour() -> ModuleType:
    spec = importlib.util.spec_from_file_location("first_hour",
                                                  ROOT / "benchmarks" / "first_hour.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


FIRST_HOUR = first_hour()


@pytest.mark.e2e
@pytest.mark.parametrize("case", FIRST_HOUR.CASES, ids=[c.name for c in FIRST_HOUR.CASES])
def test_a_new_users_mistake_fails_fast_in_one_line(case: object,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # the offline case, on any machine: no Hub cache, and a Hub that refuses connections
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    outcome = FIRST_HOUR.attempt(case)
    assert outcome.code == 2, outcome
    assert outcome.seconds <= 10.0, outcome
    assert outcome.lines == 1 and outcome.message.startswith("config error: "), outcome
    assert case.expect in outcome.message, outcome
    assert not outcome.traceback and outcome.leftovers == [], outcome
