"""The algorithm registry refuses what would only fail on a client, mid-run."""

from __future__ import annotations

import pytest

from strategies.fedavg import FedAvg
from strategies.registry import Algorithm, RegistryError, algorithms, check_rules, local_rules


class NamesAMissingRule(FedAvg):
    local_rule = "no-such-rule"


def test_an_algorithm_whose_local_rule_nobody_registers_is_refused() -> None:
    registered, rules = algorithms(), local_rules()
    check_rules(registered, rules)  # every shipped algorithm names a registered rule
    broken = {**registered, "fedx": Algorithm("fedx", NamesAMissingRule)}
    with pytest.raises(RegistryError, match="'fedx' names the local rule 'no-such-rule'"):
        check_rules(broken, rules)
