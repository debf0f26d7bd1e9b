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


def test_a_stale_copy_of_the_keys_is_refused_where_the_algorithms_load(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An algorithm whose Params changed without `make docs`: the run config would validate
    its key against the old copy; the registry refuses it instead."""
    from plateau import config
    from strategies import registry

    keys = registry.param_keys()
    table = dict(config.algorithm_fields())
    registry.check_key_table(keys)
    name = next(iter(table))
    monkeypatch.setitem(table, name, config.key(123.0, "an old default", min=0))
    monkeypatch.setattr(config, "algorithm_fields", lambda: table)
    with pytest.raises(registry.RegistryError, match=rf"stale for \['{name}'\]: run make docs"):
        registry.check_key_table(keys)
