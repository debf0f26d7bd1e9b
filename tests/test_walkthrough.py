"""deploy/README.md section 2, run as written: the block between its walkthrough markers is
read from the file and run by bash from the checkout's root, with only its variables (WORK and
the ports) pointed elsewhere. It must end with a completed run whose summary is where the
guide says, stop everything it started with its own last line, and write nothing into the
checkout."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from server_app.launcher import _alive, free_port

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "deploy" / "README.md"
BLOCK = re.compile(r"<!-- walkthrough:begin -->\n```bash\n(.*?)```\n<!-- walkthrough:end -->",
                   re.DOTALL)


def walkthrough() -> str:
    match = BLOCK.search(GUIDE.read_text())
    assert match is not None, "deploy/README.md has lost its walkthrough markers"
    return match.group(1)


def processes_with(marker: bytes) -> list[int]:
    """Live processes whose environment holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0") and _alive(
                    int(entry.name)):
                found.append(int(entry.name))
    return found


def untracked() -> set[str]:
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout
    return {line[3:] for line in status.splitlines() if line.startswith("??")}


def test_the_walkthrough_block_is_one_script_with_its_cleanup() -> None:
    script = walkthrough()
    assert script.count("```") == 0 and "kill $(cat" in script.splitlines()[-1]
    assert not re.search(r"^\s*pkill", script, re.MULTILINE)
    assert "source .venv/bin/activate" in script


@pytest.mark.e2e
def test_the_deployment_walkthrough_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "VIRTUAL_ENV")}
    env |= {"WORK": str(work), "LINK_PORT": str(free_port()),
            "NODE_PORTS": f"{free_port()} {free_port()}"}
    before = untracked()
    marker = f"FLWR_HOME={work / 'flwr-home'}".encode()
    started = time.monotonic()
    shell = subprocess.Popen(["bash", "-e", "-c", walkthrough()], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        output, _ = shell.communicate(timeout=600)
        elapsed = time.monotonic() - started
        assert shell.returncode == 0, output[-4000:]
        assert '"status": "finished:completed"' in output, output[-4000:]
        summary = json.loads((work / "results" / "walkthrough" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["rounds_completed"] == 2
        assert summary["final_accuracy"] > 0.8, summary["final_accuracy"]  # chance: 0.1
        assert summary["record_privacy"]["silo_status"] == {"0": "within budget",
                                                            "1": "within budget"}
        deadline = time.monotonic() + 30
        while processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_with(marker) == [], "the guide's last line left processes running"
        assert untracked() == before, untracked() - before
        print(f"walkthrough: {elapsed:.0f} s, final accuracy {summary['final_accuracy']:.3f}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        for pid in processes_with(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
