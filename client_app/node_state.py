"""Client algorithm state (SCAFFOLD's c_i, FedDyn's and FedSpeed's H_i, FedSMOO's mu_i) kept on
the node's own disk, so that a resumed run continues it.

Flower gives every run a fresh ``Context``: a server that resumes from its checkpoint starts a new
run, and the state a SuperNode kept in ``Context.state`` is gone. A node with a state folder
(node config ``state-dir``, or ``PLATEAU_NODE_STATE_DIR`` for simulations) also writes its state
after every round it trains, to ``<state-dir>/<run-name>/<algorithm>/partition-<id>/round-<r>.pt``
(atomically), and reads, before round r, the newest file of a round before r. A round replayed
after a crash therefore starts from the state before it, as the server's checkpoint does. The
state never leaves the node; the newest two files are kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from plateau.privacy.mechanism import Tensors

STATE_DIR_ENV = "PLATEAU_NODE_STATE_DIR"
KEEP = 2
_FILE = re.compile(r"round-(\d+)\.pt")


def state_folder(node_config: Mapping[str, object], run_name: str, algorithm: str,
                 partition: int) -> Path | None:
    """Where this node keeps its state for the run, or None when it keeps none on disk (no
    state folder configured, or a run without a name to resume by)."""
    root = str(node_config.get("state-dir", "") or os.environ.get(STATE_DIR_ENV, ""))
    if not root or not run_name:
        return None
    return Path(root).expanduser() / run_name / algorithm / f"partition-{partition}"


def _rounds(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _FILE.fullmatch(p.name)))


def load_before(folder: Path, server_round: int) -> dict[str, Tensors] | None:
    """The state this node wrote after its last round before ``server_round`` (None if none)."""
    earlier = [r for r in _rounds(folder) if r < server_round]
    if not earlier:
        return None
    state = torch.load(folder / f"round-{earlier[-1]}.pt", weights_only=True)
    return {name: dict(tensors) for name, tensors in state.items()}


def save_after(folder: Path, server_round: int, state: Mapping[str, Tensors]) -> None:
    """Write the state after ``server_round`` atomically; keep the newest ``KEEP`` files. The
    state is computed from the node's data without noise: the folder is the node user's alone."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    target = folder / f"round-{server_round}.pt"
    partial = target.with_suffix(".partial")
    torch.save({name: {k: v.detach().cpu() for k, v in tensors.items()}
                for name, tensors in state.items()}, partial)
    os.replace(partial, target)
    for stale in _rounds(folder)[:-KEEP]:
        (folder / f"round-{stale}.pt").unlink(missing_ok=True)


def clear(folder: Path) -> None:
    """Remove the state files of an earlier run of the same name."""
    for stale in _rounds(folder):
        (folder / f"round-{stale}.pt").unlink(missing_ok=True)
