"""A SuperNode's own privacy policy, read from its node config (the silo's, not the server's).

The run config comes from whoever submits the run; the node config is set by the silo's operator
when the SuperNode starts. Every key a silo may set is parsed and checked here, once, with an
error that names the key; torch-free, so the ClientApp process can enforce it before any work.

Record-level keys (see README "Record-level DP"):

* ``require-record-dp``: refuse runs without record-level DP (implied by the two keys after it);
* ``min-record-noise-multiplier``: the least noise a run may put on this silo's records;
* ``max-record-epsilon``: the silo's record-level budget, across every run that uses its data;
* ``max-record-delta``: the delta that budget is checked at (default min(1e-5, 0.01/n));
* ``record-ledger``: the file the silo's spend is kept in (required by the two budget keys:
  without it a budget would be per run, and a server starting new runs would spend it again);
* ``record-public-size``: a public lower bound on the silo's record count. With it, the silo
  samples and sets delta from that public number, so every figure it reports comes from public
  numbers, and its epsilon is accounted under add/remove; without it the count stays on the silo
  and the epsilon is accounted under substitution (one record replaced: the count is not
  protected);
* ``publish-record-epsilon``: under client-level DP, report the silo's epsilon to the server even
  though, without ``record-public-size``, it reveals the silo's record count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class NodeConfigError(ValueError):
    """A SuperNode whose node config is wrong, or whose policy refuses the run."""


def _flag(node: Mapping[str, object], key: str) -> bool:
    value = node.get(key, False)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise NodeConfigError(f"node config {key}={value!r}: expected true or false")


def _number(node: Mapping[str, object], key: str, default: float, *, low: float = 0.0,
            high: float = math.inf, low_inclusive: bool = True) -> float:
    value = node.get(key, default)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    inside = (number >= low if low_inclusive else number > low) and number <= high
    if not inside or math.isnan(number):
        bounds = f"{'>=' if low_inclusive else '>'} {low:g}" + (
            f" and <= {high:g}" if math.isfinite(high) else "")
        raise NodeConfigError(f"node config {key}={value!r}: expected a number {bounds}")
    return number


@dataclass(frozen=True)
class SiloPolicy:
    """What this silo's operator allows and promises about its records."""

    require_record_dp: bool = False
    min_record_noise_multiplier: float = 0.0
    max_record_epsilon: float = 0.0  # 0: no budget of the silo's own
    max_record_delta: float = 0.0  # 0: min(1e-5, 0.01 / n)
    record_public_size: int = 0  # 0: none declared; the record count stays on the silo
    record_ledger: Path | None = None
    publish_record_epsilon: bool = False

    @classmethod
    def from_node_config(cls, node: Mapping[str, object]) -> SiloPolicy:
        """Parse and check the node config's record-level keys."""
        size = _number(node, "record-public-size", 0)
        if size != int(size):
            raise NodeConfigError(f"node config record-public-size={node['record-public-size']!r}"
                                  ": expected a whole number of records")
        ledger = str(node.get("record-ledger", "") or "")
        if ledger and not Path(ledger).expanduser().is_absolute():
            raise NodeConfigError(f"node config record-ledger={ledger!r}: expected an absolute "
                                  "path (the ClientApp and the warm trainer run in different "
                                  "folders, and must share one ledger)")
        policy = cls(
            require_record_dp=_flag(node, "require-record-dp"),
            min_record_noise_multiplier=_number(node, "min-record-noise-multiplier", 0.0),
            max_record_epsilon=_number(node, "max-record-epsilon", 0.0),
            max_record_delta=_number(node, "max-record-delta", 0.0, high=1.0),
            record_public_size=int(size),
            record_ledger=Path(ledger).expanduser() if ledger else None,
            publish_record_epsilon=_flag(node, "publish-record-epsilon"),
        )
        if policy.record_ledger is None and (policy.max_record_epsilon > 0
                                             or policy.require_record_dp):
            key = "max-record-epsilon" if policy.max_record_epsilon > 0 else "require-record-dp"
            raise NodeConfigError(
                f"node config {key} needs record-ledger=<file>: without a ledger on the silo's "
                "disk the budget would only hold for one run, and a server starting new runs "
                "would spend it again")
        return policy

    @property
    def requires_record_dp(self) -> bool:
        """Whether runs without record-level DP are refused: asked for, or implied by a budget
        or a noise floor (a run with record-dp='off' would otherwise train on the records
        with no charge on the ledger and no noise at all)."""
        return (self.require_record_dp or self.max_record_epsilon > 0
                or self.min_record_noise_multiplier > 0)

    def silo_delta(self, size: int) -> float:
        """The silo's own delta for ``size`` records (its public size, or its record count)."""
        return self.max_record_delta or min(1e-5, 0.01 / max(size, 1))
