"""The house rules, checked on the source: Flower's undocumented internals are reached only
through ``plateau/flower_compat.py``, and imports point down the floors (``plateau`` <
``strategies`` < ``server_app``, ``client_app``, ``node`` < ``study``, ``benchmarks``) with no
circle among modules. Each scan is also run on a snippet that breaks its rule."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"plateau": 1, "strategies": 2, "server_app": 3, "client_app": 3, "node": 3,
          "study": 4, "benchmarks": 4}
# Flower's documented modules; a name imported from one must be in its __all__
PUBLIC_FLOWER = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy",
                 "flwr.simulation", "flwr.common")
COMPAT = "plateau/flower_compat.py"
# the compat module's own tests reach what it does; this file names them to test the scan
EXEMPT = (COMPAT, "tests/test_flower_compat.py", "tests/test_layers.py")


def python_files(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _public(module: str, name: str) -> bool:
    """Whether ``module.name`` is documented: a public module, or a name it exports."""
    if f"{module}.{name}" in PUBLIC_FLOWER:
        return True
    if module not in PUBLIC_FLOWER:
        return False
    exported = set(getattr(importlib.import_module(module), "__all__", ()))
    return name in exported and not name.startswith("_")


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"], else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def private_flower_uses(source: str) -> list[str]:
    """Every import of a Flower module or name that Flower does not document, every attribute
    reached through an imported Flower module (``import flwr.common as c; c.serde``), and
    every string naming such a module (``importlib.import_module("flwr.supercore...")``)."""
    found = []
    modules: dict[str, str] = {}  # a local name bound to a Flower module -> the module
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "flwr" or alias.name.startswith("flwr."):
                    if alias.name != "flwr" and alias.name not in PUBLIC_FLOWER:
                        found.append(alias.name)
                    if alias.asname:
                        modules[alias.asname] = alias.name
                    else:
                        modules["flwr"] = "flwr"
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                node.module == "flwr" or node.module.startswith("flwr.")):
            if node.module != "flwr" and node.module not in PUBLIC_FLOWER:
                found.append(node.module)
                continue
            for alias in node.names:
                if not _public(node.module, alias.name):
                    found.append(f"{node.module}.{alias.name}")
                elif f"{node.module}.{alias.name}" in PUBLIC_FLOWER:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith("flwr.") and " " not in node.value
              and node.value.split(":")[0] not in PUBLIC_FLOWER):
            found.append(node.value)
    for node in ast.walk(tree):
        parts = _dotted(node) if isinstance(node, ast.Attribute) else None
        if not parts or parts[0] not in modules:
            continue
        module = modules[parts[0]]
        for name in parts[1:]:
            if not _public(module, name):
                found.append(f"{module}.{name}")
                break
            if f"{module}.{name}" not in PUBLIC_FLOWER:
                break  # an exported name: what it holds is its own API
            module = f"{module}.{name}"
    return sorted(set(found))


def test_the_scan_sees_private_flower_names() -> None:
    assert private_flower_uses("from flwr.supercore import log") == ["flwr.supercore"]
    assert private_flower_uses("import flwr.common as c\nc.serde.recorddict_to_proto") == [
        "flwr.common.serde"]
    assert private_flower_uses("import flwr\nflwr.supercore.log") == ["flwr.supercore"]
    assert private_flower_uses("from flwr import common\ncommon.constant.X") == [
        "flwr.common.constant"]
    assert private_flower_uses("import flwr.app\nflwr.app.Message\nimport flwr.simulation") == []
    assert private_flower_uses("from flwr.common.serde import x") == ["flwr.common.serde"]
    assert private_flower_uses("from flwr.common import serde") == ["flwr.common.serde"]
    assert private_flower_uses("import flwr.superlink.grid") == ["flwr.superlink.grid"]
    assert private_flower_uses("m = 'flwr.supernode.cli'") == ["flwr.supernode.cli"]
    assert private_flower_uses("from flwr.app import Message\nfrom flwr.common import log\n"
                               "import flwr.simulation") == []


def test_no_private_flower_name_outside_the_compat_module() -> None:
    uses = {}
    for path in python_files("plateau", "strategies", "server_app", "client_app", "node",
                             "study", "benchmarks", "tests", "deploy", "docker"):
        relative = path.relative_to(ROOT).as_posix()
        if relative in EXEMPT:
            continue
        found = private_flower_uses(path.read_text())
        if found:
            uses[relative] = found
    assert uses == {}, f"Flower internals outside {COMPAT}: {uses}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> the first-party modules it imports (at any depth: lazy, type-only and
    ``importlib.import_module("...")`` imports included). ``sources``: module -> (source,
    whether it is a package's ``__init__``)."""
    modules = set(sources)

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, (source, is_package) in sources.items():
        package = module if is_package else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets |= {f"{base}.{a.name}" for a in node.names} | {base}
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                targets.add(str(node.args[0].value))
        graph[module] = {found for t in targets if (found := known(t)) and found != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                  if FLOORS[d.split(".")[0]] > FLOORS[m.split(".")[0]])


def house() -> dict[str, set[str]]:
    return import_graph({module_name(p): (p.read_text(), p.name == "__init__.py")
                         for p in python_files(*FLOORS)})


def test_the_scans_see_a_circle_and_an_upward_arrow() -> None:
    graph = import_graph({
        "plateau": ("", True), "plateau.config": ("from plateau import registry", False),
        "plateau.registry": ("from .config import key\nimport importlib\n"
                             "importlib.import_module('strategies')", False),
        "strategies": ("", True)})
    assert circles(graph) == [["plateau.config", "plateau.registry"]]
    assert upward(graph) == ["plateau.registry -> strategies"]


def fab_packages() -> set[str]:
    """The packages the FAB holds (pyproject.toml ``[tool.flwr.app] fab-include``)."""
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "fab-include"]
    return {pattern.split("/")[0] for pattern in patterns}


def outside_the_fab(graph: dict[str, set[str]], fab: set[str]) -> list[str]:
    """Imports from the app (what `flwr run` ships) of code it does not ship."""
    return sorted(f"{m} -> {d}" for m, deps in graph.items() if m.split(".")[0] in fab
                  for d in deps if d.split(".")[0] not in fab)


def test_the_app_imports_only_what_its_fab_ships() -> None:
    fab = fab_packages()
    assert fab == {"plateau", "strategies", "server_app", "client_app"}
    assert outside_the_fab({"client_app.app": {"node.trainer"}, "node.trainer": set()}, fab) == [
        "client_app.app -> node.trainer"]
    assert outside_the_fab(house(), fab) == []


def test_imports_point_down_the_floors_without_circles() -> None:
    graph = house()
    assert len(graph) > 100  # the scan found the house
    assert upward(graph) == []
    assert circles(graph) == []


@pytest.mark.slow
def test_the_run_config_imports_neither_the_algorithms_nor_torch() -> None:
    """The ClientApp process validates the run config before anything heavy: the config module
    reads the algorithms' keys from its generated table, not from the algorithms."""
    probe = ("import sys, plateau.config as c; c.RunConfig.from_mapping({'pgn-gamma': 0.3}); "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'strategies', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120, cwd=ROOT).stdout.strip()
    assert out == "[]"


FLOWER_VARIABLE = re.compile(r"\bFLWR_[A-Z0-9_]+")
# where Flower's environment is set: code, images, manifests, scripts (prose may name others)
SETTING_FILES = ("*.py", "*.yml", "*.yaml", "*Dockerfile*", "Makefile", "*.sh", "*.toml")


def flower_variables(text: str) -> set[str]:
    return set(FLOWER_VARIABLE.findall(text))


def test_the_variable_scan_sees_a_flower_variable() -> None:
    assert flower_variables('env = {"FLWR_NEW_KNOB": "1", "PLATEAU_X": 2}\n- FLWR_HOME') == {
        "FLWR_NEW_KNOB", "FLWR_HOME"}


def test_every_flower_variable_set_is_declared_and_read_by_this_flower() -> None:
    """Flower's environment variables are Flower internals too when undocumented: each one the
    house sets is declared in the compat module, and this Flower still reads each (the nightly
    tier runs this against Flower's next release)."""
    from plateau.flower_compat import FLOWER_ENVIRONMENT

    tracked = subprocess.run(["git", "ls-files", *SETTING_FILES, ".ci/run"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    used: dict[str, set[str]] = {}
    for relative in tracked:
        if relative.startswith("tests/test_layers.py"):
            continue
        for name in flower_variables((ROOT / relative).read_text(errors="replace")):
            used.setdefault(name, set()).add(relative)
    assert {k: sorted(v) for k, v in used.items() if k not in FLOWER_ENVIRONMENT} == {}
    flower = Path(importlib.util.find_spec("flwr").origin).parent
    source = "\n".join(path.read_text() for path in flower.rglob("*.py"))
    unread = [name for name in FLOWER_ENVIRONMENT if name not in source]
    assert unread == [], f"this Flower no longer reads {unread}: see plateau/flower_compat.py"
