"""Crash-safe checkpoints and resume.

Two files in the checkpoint folder, each written atomically (write, fsync, rename):

* ``ledger.json``: the accountant's events, the most uploads any one client has handed the server
  (what its epsilon against the server needs; no per-client counts, which are a function of the
  secret cohorts), the epsilon budget and the run's lineage id in the server's run ledger
  (``server_app.lineage``), written right after a round's noisy aggregate exists and before
  anything of the round is released, so a resumed run can never undercount epsilon;
* ``checkpoint.pt``: the global model, the strategy's state (momentum, global direction, control
  variates, ...), the round records, the resolved config and the privacy-relevant settings,
  after each completed round. No generator or sampler state: nothing in it lets anyone replay or
  predict noise or cohorts, and a resumed run draws fresh ones. (The records hold operator
  telemetry, which epsilon does not cover: the folder is the operator's.) One secret is in it:
  the in-run audit's canary key (``audit-canaries``), which a resumed run needs to regenerate
  the canaries it inserted; it derives the canaries' updates and coins, nothing of any client's
  data or noise, and whoever holds it can only subtract the canaries or spoil the audit.

A copied checkpoint folder resumed twice is refused by the run ledger (``server_app.lineage``).

``resume = true`` continues from them: the privacy-relevant settings must be unchanged (a changed
noise multiplier or sampling would make the epsilon of the continued run wrong), a DP run
without its ledger is refused, and so is one that would drop the budget the run had.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from plateau.config import ConfigError, RunConfig

# settings the accounting or the meaning of the saved state depends on
PRIVACY_KEYS = ("algorithm", "dp", "dp-clip-mode", "clip-norm", "noise-multiplier",
                "target-delta", "sampling", "sample-rate", "population-size", "audit-canaries",
                "accountant", "norm", "dp-allow-batchnorm", "dataset", "model", "model-width")
# what the saved model's tensors mean: a change is refused before any tensor is loaded (checked
# when the checkpoint names them; older checkpoints did not)
MODEL_KEYS = ("trainable", "trainable-layers", "lora-rank", "lora-alpha", "lora-targets",
              "max-length")
CHECKPOINT = "checkpoint.pt"
LEDGER = "ledger.json"


def privacy_settings(config: RunConfig) -> dict[str, Any]:
    """The privacy-relevant part of a config."""
    values = config.to_dict()
    return {key: values[key] for key in (*PRIVACY_KEYS, *MODEL_KEYS)}


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def checkpoint_folder(config: RunConfig, run_name: str | None = None) -> Path:
    """``checkpoint-dir``, or <results-dir>/<run-name>/checkpoint."""
    if config.checkpoint_dir:
        return Path(config.checkpoint_dir).expanduser()
    return Path(config.results_dir).expanduser() / (run_name or config.run_name) / "checkpoint"


def check_resume(config: RunConfig) -> None:
    """What a resume will refuse, checked before Flower starts (``make run``'s launcher): no
    checkpoint, changed settings, a missing ledger, or a checkpoint another copy of it has
    continued. Nothing is written."""
    from .lineage import RunLineage, run_ledger_folder

    _, ledger = Checkpointer(checkpoint_folder(config)).load(config)
    if ledger is not None and ledger.get("lineage"):
        RunLineage(run_ledger_folder(config), str(ledger["lineage"])).check_resume(
            len(ledger["events"]), write=False)


class Checkpointer:
    """Writes and reads one run's checkpoint folder (created by the first write: a resume that
    is refused leaves no empty folder behind)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save_ledger(self, server_round: int, settings: dict[str, Any],
                    events: list[dict[str, Any]], max_participations: int = 0,
                    budget: float = 0.0, lineage: str | None = None) -> None:
        """The accountant's events after ``server_round``, the most uploads one client has
        handed the server, the epsilon budget and the run ledger's lineage id (before the
        round's results are released)."""
        payload = json.dumps({"round": server_round, "privacy": settings, "events": events,
                              "max_participations": max_participations, "budget": budget,
                              "lineage": lineage})
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.folder / LEDGER, lambda h: h.write(payload.encode()))

    def save(self, state: dict[str, Any]) -> None:
        """The whole server state after a completed round."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.folder / CHECKPOINT, lambda h: torch.save(state, h))

    def load(self, config: RunConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The checkpoint and the ledger, after checking they may be continued."""
        path = self.folder / CHECKPOINT
        if not path.is_file():
            raise ConfigError(f"resume=true but there is no checkpoint at {path}: resume needs "
                              "the run-name (and results-dir or checkpoint-dir) of a run that "
                              "wrote one")
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved, current = state["privacy"], privacy_settings(config)
        changed = [k for k in PRIVACY_KEYS if saved.get(k) != current[k]]
        if changed:
            diffs = ", ".join(f"{k} {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise ConfigError(f"resume refused: privacy-relevant settings changed ({diffs}); "
                              "they must match the checkpoint")
        reshaped = [k for k in MODEL_KEYS if k in saved and saved[k] != current[k]]
        if reshaped:
            diffs = ", ".join(f"{k} {saved[k]!r} -> {current[k]!r}" for k in reshaped)
            raise ConfigError(f"resume refused: what the saved model holds changed ({diffs}); "
                              "they must match the checkpoint")
        ledger_path = self.folder / LEDGER
        ledger = None
        if ledger_path.is_file():
            ledger = json.loads(ledger_path.read_text())
            if ledger["round"] < state["round"]:
                raise ConfigError(f"the ledger ({ledger['round']} rounds) is older than the "
                                  f"checkpoint ({state['round']} rounds); refusing to undercount")
            budget = float(ledger.get("budget", 0.0))
            if budget > 0 and config.target_epsilon <= 0 and config.max_epsilon <= 0:
                raise ConfigError(f"resume refused: the run was capped at epsilon={budget:g}; "
                                  "set target-epsilon or max-epsilon (raising it is how a "
                                  "budget is extended)")
        if config.dp_enabled and ledger is None:
            raise ConfigError(f"resume refused: {ledger_path} (the accountant's state) is "
                              "missing, so the epsilon spent so far is unknown")
        return state, ledger
