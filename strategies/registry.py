"""The algorithm registry: every algorithm registers itself, once, from its own module.

An algorithm is one module in ``strategies/`` that holds its server rule (a strategy class), its
client rule(s) (functions of a ``plateau.local.LocalTask``) and its typed hyper-parameters (a
``plateau.config.Params`` dataclass), and ends with ``register(Algorithm(...))``. Everything else
is derived from here: the strategy table the ServerApp builds from, the local rules a client may
be asked to run, the run-config keys (``pyproject.toml``, the README tables) and the algorithms
table. Adding ``strategies/fedx.py`` is enough; no list elsewhere names it.

This module imports nothing heavy: the run config asks it for the algorithm keys, and only then
are the algorithm modules (torch, the strategy base) imported.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plateau.config import Params
    from plateau.local import LocalTask
    from plateau.privacy.mechanism import Tensors

ALGORITHMS_PACKAGE = "strategies"


@dataclass(frozen=True)
class LocalRule:
    """A client-side rule: its K-step loop (returns the vector the client releases) and its cost
    in backprops per step (the record-level DP accountant counts one noisy query per backprop)."""

    run: Callable[[LocalTask], Tensors]
    backprops_per_step: int


@dataclass(frozen=True)
class Algorithm:
    """One registered algorithm.

    Parameters
    ----------
    name : str
        The value of the ``algorithm`` run-config key.
    strategy : type
        Its server half, a ``strategies.base.PlateauStrategy`` subclass; its ``local_rule`` names
        one of ``rules``.
    rules : Mapping[str, LocalRule]
        The client rules this algorithm defines (a form key may choose among them). Rules other
        algorithms define are reused by naming them in the strategy, not redeclared.
    params : tuple[type[Params], ...]
        The hyper-parameter groups it reads (its own, or shared ones such as the SAM radius).
    core : bool
        One of the two papers Plateau is built around: listed first in the tables.
    """

    name: str
    strategy: type
    rules: Mapping[str, LocalRule] = field(default_factory=dict)
    params: tuple[type[Params], ...] = ()
    core: bool = False


_REGISTERED: dict[str, Algorithm] = {}
_RULES: dict[str, LocalRule] = {}
_KEYS: dict[str, tuple[type[Params], dataclasses.Field[Any]]] = {}


class RegistryError(RuntimeError):
    """Two algorithms claim the same name, local rule or run-config key."""


def register(algorithm: Algorithm) -> Algorithm:
    """Add an algorithm (called once, at the end of its module). A name, local rule or key that
    another algorithm already uses for something else is refused."""
    if algorithm.name in _REGISTERED:
        raise RegistryError(f"algorithm {algorithm.name!r} is registered twice")
    for name, rule in algorithm.rules.items():
        if _RULES.get(name, rule) is not rule:
            raise RegistryError(f"local rule {name!r} of {algorithm.name!r} is already defined "
                                "by another algorithm")
    for group in algorithm.params:
        for key, spec in group.key_fields().items():
            owner = _KEYS.get(key, (group, spec))[0]
            if owner is not group:
                raise RegistryError(f"run-config key {key!r} of {algorithm.name!r} is already "
                                    f"declared by {owner.__name__}")
    _REGISTERED[algorithm.name] = algorithm
    _RULES.update(algorithm.rules)
    for group in algorithm.params:
        for key, spec in group.key_fields().items():
            _KEYS[key] = (group, spec)
    return algorithm


@functools.cache
def load() -> None:
    """Import every module of the algorithms package (each registers itself), once per process:
    the run config asks for the keys on every message."""
    package = importlib.import_module(ALGORITHMS_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{ALGORITHMS_PACKAGE}.{module.name}")
    check_rules(_REGISTERED, _RULES)
    check_key_table(_KEYS)


def check_key_table(keys: Mapping[str, tuple[type[Params], dataclasses.Field[Any]]]) -> None:
    """The run config validates the algorithms' keys against its generated copy of them
    (``plateau/algorithm_keys.py``): a copy that differs from the registered ``Params`` (an
    algorithm added or changed without ``make docs``) is refused here, in every process that
    loads the algorithms, not left to validate with stale defaults or ranges."""
    from plateau.config import algorithm_fields

    def spec(f: dataclasses.Field[Any]) -> tuple[Any, ...]:
        return f.default, f.metadata["doc"], f.metadata["check"]

    table = algorithm_fields()
    stale = sorted(k for k in {*keys, *table}
                   if k not in keys or k not in table or spec(keys[k][1]) != spec(table[k]))
    if stale:
        raise RegistryError(f"plateau/algorithm_keys.py is stale for {stale}: run make docs")


def check_rules(registered: Mapping[str, Algorithm], rules: Mapping[str, LocalRule]) -> None:
    """Every algorithm's fixed ``local_rule`` names a rule some algorithm registered (checked
    once all are loaded: a rule may be another module's). A rule chosen by a form (a property)
    is checked by the client, which refuses a rule it does not know."""
    for algorithm in registered.values():
        rule = getattr(algorithm.strategy, "local_rule", None)
        if isinstance(rule, str) and rule not in rules:
            raise RegistryError(f"algorithm {algorithm.name!r} names the local rule {rule!r}, "
                                f"which no algorithm registers; known: {sorted(rules)}")


def algorithms() -> dict[str, Algorithm]:
    """Every algorithm, the two core papers' first, then by name."""
    load()
    return dict(sorted(_REGISTERED.items(), key=lambda item: (not item[1].core, item[0])))


def local_rules() -> dict[str, LocalRule]:
    """Every local rule a client can be asked to run, by the name the server sends."""
    load()
    return dict(_RULES)


def param_keys() -> dict[str, tuple[type[Params], dataclasses.Field[Any]]]:
    """Run-config key -> (hyper-parameter group, its field), in registration order."""
    load()
    return dict(_KEYS)

