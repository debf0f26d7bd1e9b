"""Every Flower name that Flower does not document, in one place, each one feature-detected.

Plateau uses Flower's public API (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``,
``flwr.simulation``, ``flwr.common``'s exported names, the console scripts). A few things it
needs are only in Flower's internals; they are reached through this module and nowhere else
(``tests/test_layers.py`` scans the code for any other use). Each accessor checks that the
internal is there and looks as expected; where it is not (another Flower), the caller falls
back to Flower's own behaviour and this module logs one warning per feature:

- the pace at which a deployed ServerApp, SuperNode and ClientApp retry pulling the objects of
  a message (``pace_serverapp_pulls``, ``pace_supernode_loop``, ``pace_clientapp_pulls``):
  otherwise Flower's own backoff (1 s, doubling to 10 s) and the SuperNode's 3 s idle sleep;
- Flower's protobuf serialisation of a ``RecordDict`` and a ``Context`` (``serde``), which
  the ClientApp and the node's warm trainer exchange: otherwise a node with a trainer refuses
  the work with the reason (training elsewhere would bypass the trainer's data and record
  ledger), and the trainer does not start;
- what an in-process Grid needs to look like Flower's (``local_grid_names``): otherwise a
  study cell runs on Flower's own simulation engine; whether a Grid is the simulation's
  (``is_simulation_grid``): otherwise the server waits as long as for real SuperNodes;
- the SuperExec's executor (``superexec_internals``), which the node's fork-server SuperExec
  extends: only on the exact Flower version it was written against (``FORK_SERVER_FLOWER``),
  otherwise Flower's own SuperExec.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from types import ModuleType
from typing import Any

from flwr.common import log

# how often a SuperExec looks for submitted work: an environment variable Flower reads but does
# not document (1 s by default); set for the local SuperExec of `make run`, and in the
# deployments' manifests. Another Flower ignores it: then its own pace
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
# the port of the local SuperLink `flwr run` starts (default 39091), read by Flower's CLI but not
# documented: the launcher picks a free one per run
LOCAL_SUPERLINK_PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
# every Flower environment variable Plateau sets (launcher, images, manifests, tests), and what
# it is to Flower: the documented ones, and those Flower reads without documenting them (an
# upgrade may drop one: tests/test_layers.py checks this Flower still reads each, and that
# nothing else named FLWR_* is set anywhere)
FLOWER_ENVIRONMENT = {
    "FLWR_HOME": "documented: Flower's configuration and state folder",
    "FLWR_TELEMETRY_ENABLED": "documented: 0 turns Flower's telemetry off",
    "FLWR_DISABLE_UPDATE_CHECK": "undocumented: 1 skips the check for a newer Flower",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION":
        "undocumented (a flag of flower-superlink too): 1 installs no FAB dependencies",
    LOCAL_SUPERLINK_PORT_ENV: "undocumented: the local SuperLink's HTTP API port",
    SUPEREXEC_POLL_ENV: "undocumented: a SuperExec's wait between looks for work",
}
# benchmarks only: PLATEAU_PACE_PULLS=0 leaves every pull below at Flower's own pace, to
# measure what the pacing saves on a deployed round (benchmarks/runtime.py)
PACE_ENV = "PLATEAU_PACE_PULLS"
FORK_SERVER_FLOWER = "1.42.0"  # the SuperExec internals node.superexec was written against
_WARNED: set[str] = set()


def warn_once(feature: str, message: str, *args: Any) -> None:
    """One warning per feature and process: a fallback is news once, not every round."""
    if feature not in _WARNED:
        _WARNED.add(feature)
        log(WARNING, message, *args)


def flower_version() -> str:
    """The version of the distribution that provides the ``flwr`` package (a release, or a
    nightly build); "unknown (...)" where none or several do (a nightly installed over a
    release: whose files are these?)."""
    owners = sorted(set(importlib.metadata.packages_distributions().get("flwr", [])))
    if len(owners) != 1:
        return f"unknown (flwr provided by {owners or 'no distribution'})"
    return importlib.metadata.version(owners[0])


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _source(obj: object) -> str:
    """Its source text, or "" where there is none (a zipped or compiled install)."""
    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def console_script(name: str) -> tuple[str, str] | None:
    """(module, function) of Flower's console script ``name`` (``flwr-clientapp``), from the
    installed distribution's metadata."""
    found = importlib.metadata.entry_points(group="console_scripts", name=name)
    for entry in found:
        module, _, function = entry.value.partition(":")
        return module.strip(), function.strip()
    return None


def run_console_script(name: str, argv: list[str]) -> object:
    """Run Flower's console script ``name`` in this process with ``argv``, as its launcher
    would (``flower-supernode``, ``flower-superexec``)."""
    target = console_script(name)
    if target is None:
        raise SystemExit(f"{name}: no such Flower console script in this environment")
    sys.argv = [name, *argv]
    return getattr(importlib.import_module(target[0]), target[1])()


# --------------------------------------------------------------------- paced object pulls


class PacedTime:
    """The ``time`` module, except that no sleep lasts longer than ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.interval))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def paced_pulls(pull: Callable[..., Any], interval: float) -> Callable[..., Any] | None:
    """``pull`` (Flower's ``pull_objects`` or ``pull_and_inflate_object_from_tree``) retrying an
    object that is not there yet after ``interval`` s, then at most every ``4 * interval`` s,
    instead of after 1 s, doubling up to 10 s; None if ``pull`` has no such parameters."""
    parameters = inspect.signature(pull).parameters
    if not {"initial_backoff", "backoff_cap"} <= set(parameters):
        return None
    first = min(interval, parameters["initial_backoff"].default)
    cap = max(first, min(4 * interval, parameters["backoff_cap"].default))

    @functools.wraps(pull)
    def paced(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", first)
        kwargs.setdefault("backoff_cap", cap)
        return pull(*args, **kwargs)

    paced.paced_interval = interval  # type: ignore[attr-defined]
    return paced


def pacing_enabled() -> bool:
    """Whether the pace_* functions change anything (:data:`PACE_ENV`; on unless set to 0)."""
    return os.environ.get(PACE_ENV, "1") != "0"


def pace_serverapp_pulls(interval: float) -> bool:
    """Make a deployed ServerApp fetch the pieces of a reply it is told about after
    ``interval`` s, at most every ``4 * interval`` s, instead of Flower's 1 s doubling to 10 s
    (about a second of every deployed round). False, and one warning, where this Flower has no
    such pull: then Flower's own pace. False without a word when pacing is turned off."""
    if not pacing_enabled():
        return False
    grid = _module("flwr.superlink.grid.http_grid")
    pull = getattr(grid, "pull_objects", None)
    if grid is None or not callable(pull):
        warn_once("serverapp-pulls", "reply pieces are pulled at Flower's own pace (up to 10 s "
                  "a round): this Flower has no http_grid.pull_objects")
        return False
    if getattr(pull, "paced_interval", None) is not None:
        return True
    paced = paced_pulls(pull, interval)
    if paced is None:
        warn_once("serverapp-pulls", "reply pieces are pulled at Flower's own pace (up to 10 s "
                  "a round): this Flower's pull_objects takes no backoff")
        return False
    grid.pull_objects = paced  # type: ignore[attr-defined]
    return True


def pace_supernode_loop(interval: float) -> bool:
    """Make Flower's SuperNode pull loop wait at most ``interval`` s for work, and retry the
    objects of a message it is pulling (the ServerApp may still be pushing them) after
    ``interval`` s, at most ``4 * interval`` s; False, and one warning, if it is not the loop
    this was written for (then nothing is changed). False without a word when pacing is
    turned off."""
    if not pacing_enabled():
        return False
    loop = _module("flwr.supernode.start_client_internal")
    source = _source(loop) if loop is not None else ""
    pull = getattr(loop, "pull_objects", None)
    paced = paced_pulls(pull, interval) if callable(pull) else None
    if ("time.sleep(3)" not in source or "pull_objects(" not in source or paced is None
            or not isinstance(getattr(loop, "time", None), type(time))):
        warn_once("supernode-loop", "this Flower's SuperNode loop is not the one "
                  "--poll-interval paces: it runs unchanged")
        return False
    loop.time = PacedTime(interval)  # type: ignore[union-attr]
    loop.pull_objects = paced  # type: ignore[union-attr]
    log(INFO, "SuperNode looks for work every %g s", interval)
    return True


def pace_clientapp_pulls(interval: float) -> str | None:
    """In a ClientApp process: ask the SuperNode again for a message's objects that are not
    there yet after ``interval`` s, at most every ``4 * interval`` s, instead of after 1 s, 2,
    4... s. None if done, else why not (the caller warns)."""
    if not pacing_enabled():
        return f"pacing is turned off ({PACE_ENV}=0)"
    runtime = _module("flwr.supernode.runtime.run_clientapp")
    if runtime is None:
        return "this Flower has no flwr.supernode.runtime.run_clientapp"
    pull = getattr(runtime, "pull_and_inflate_object_from_tree", None)
    paced = paced_pulls(pull, interval) if callable(pull) else None
    task_input = getattr(runtime, "pull_task_input", None)
    if paced is None or task_input is None or "pull_and_inflate_object_from_tree(" not in (
            _source(task_input)):
        return "this Flower's ClientApp pulls messages another way"
    runtime.pull_and_inflate_object_from_tree = paced  # type: ignore[attr-defined]
    return None


# ------------------------------------------------------------ RecordDict/Context as bytes


@dataclass(frozen=True)
class Serde:
    """Flower's own protobuf serialisation of a ``RecordDict`` and a ``Context``."""

    recorddict_to_bytes: Callable[[Any], bytes]
    recorddict_from_bytes: Callable[[bytes], Any]
    context_to_bytes: Callable[[Any], bytes]
    context_from_bytes: Callable[[bytes], Any]
    decode_errors: tuple[type[BaseException], ...]


@functools.cache
def serde() -> Serde | None:
    """Flower's serialisation, or None (and one warning) where this Flower has moved it."""
    try:
        from google.protobuf.message import DecodeError
        flower_serde = importlib.import_module("flwr.common.serde")
        ProtoContext = importlib.import_module("flwr.proto.message_pb2").Context
        ProtoRecordDict = importlib.import_module(
            "flwr.proto.recorddict_pb2").RecordDict
        to_record, from_record = (flower_serde.recorddict_to_proto,
                                  flower_serde.recorddict_from_proto)
        to_context, from_context = flower_serde.context_to_proto, flower_serde.context_from_proto
    except (ImportError, AttributeError) as error:
        warn_once("serde", "this Flower's RecordDict/Context serialisation is not the expected "
                  "one (%s): a node's warm trainer cannot be used", error)
        return None

    def parse(kind: type, data: bytes) -> Any:
        message = kind()
        message.ParseFromString(data)
        return message

    return Serde(
        recorddict_to_bytes=lambda record: to_record(record).SerializeToString(),
        recorddict_from_bytes=lambda data: from_record(parse(ProtoRecordDict, data)),
        context_to_bytes=lambda context: to_context(context).SerializeToString(),
        context_from_bytes=lambda data: from_context(parse(ProtoContext, data)),
        decode_errors=(DecodeError,))


# ----------------------------------------------------------------- Grids


def simulation_grid_class() -> type | None:
    """The simulation engine's Grid class if the simulation has loaded it (its module pulls in
    the SuperLink's whole stack, so it is only looked up, never imported); else None."""
    engine = sys.modules.get("flwr.superlink.grid")
    found = getattr(engine, "InMemoryGrid", None)
    if engine is not None and not isinstance(found, type):
        warn_once("simulation-grid", "this Flower's simulation Grid is not InMemoryGrid: the "
                  "server waits for nodes to settle as long as on a deployment")
        return None
    return found


def is_simulation_grid(grid: object) -> bool:
    """Whether ``grid`` is the simulation engine's (all nodes register at once); False where
    this Flower names it otherwise (then a deployment's longer settling wait applies)."""
    found = simulation_grid_class()
    return found is not None and isinstance(grid, found)



@dataclass(frozen=True)
class LocalGridNames:
    """What a Grid of Plateau's own (the studies' in-process grid) needs from Flower."""

    empty_run: Callable[[int], Any]  # Grid.run's value for a run id
    set_task_identity: Callable[[int, int, int], None]  # run id, node id, task id
    stamp: Callable[..., None]  # (message, message_id, run_id=None): what the SuperLink sets
    superlink_node_id: int
    unknown_error: int
    client_app_raised: int


@functools.cache
def local_grid_names() -> LocalGridNames | None:
    """None (and one warning) where this Flower has moved them: studies then run on Flower's
    simulation engine."""
    try:
        from flwr.app import Metadata
        from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity
        unknown, raised = ErrorCode.UNKNOWN, ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        create_empty = Run.create_empty
        probe = Metadata(run_id=0, message_id="", src_node_id=0, dst_node_id=0,
                         reply_to_message_id="", group_id="", created_at=0.0, ttl=1.0,
                         message_type="train")
        if not {"_message_id", "_run_id"} <= set(vars(probe)):
            raise AttributeError("Metadata keeps its message and run ids elsewhere")
    except (ImportError, AttributeError, TypeError) as error:
        warn_once("local-grid", "this Flower's run and task identity are not the expected ones "
                  "(%s): the in-process grid is not available", error)
        return None

    def set_task_identity(run_id: int, node_id: int, task_id: int) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (
            run_id, node_id, task_id)

    def stamp(message: Any, message_id: str, run_id: int | None = None) -> None:
        fields = vars(message.metadata)
        fields["_message_id"] = message_id
        if run_id is not None:
            fields["_run_id"] = run_id

    return LocalGridNames(empty_run=create_empty, set_task_identity=set_task_identity,
                          stamp=stamp,
                          superlink_node_id=SUPERLINK_NODE_ID, unknown_error=unknown,
                          client_app_raised=raised)


# ------------------------------------------------------------------ the SuperExec


@dataclass(frozen=True)
class SuperExecInternals:
    """The modules of Flower 1.42's SuperExec that ``node.superexec`` extends."""

    run_superexec: ModuleType  # get_executor
    subprocess_executor: ModuleType  # its ``subprocess``, patched only to record a launch
    executor: ModuleType  # ExecutionSpec, LaunchResult, SubprocessExecutor
    constant: ModuleType  # TaskType, ExecutorType, TASK_TYPE_TO_COMMAND, ..._ADDRESS_ARG
    clientapp_runtime: str  # the module a ClientApp process runs, imported by the zygote


def superexec_internals() -> SuperExecInternals | str:
    """The SuperExec's internals on exactly ``FORK_SERVER_FLOWER``; else why not (the caller
    warns and runs Flower's own SuperExec)."""
    version = flower_version()
    if version != FORK_SERVER_FLOWER:
        return (f"the fork-server SuperExec is written against Flower {FORK_SERVER_FLOWER}, "
                f"this is {version}")
    names = ("flwr.supercore.superexec.run_superexec",
             "flwr.supercore.superexec.executor.subprocess_executor",
             "flwr.supercore.superexec.executor", "flwr.supercore.constant")
    modules = [_module(name) for name in names]
    missing = [name for name, module in zip(names, modules, strict=True) if module is None]
    clientapp = console_script("flwr-clientapp")
    if missing or clientapp is None:
        return f"this Flower has no {', '.join(missing) or 'flwr-clientapp console script'}"
    return SuperExecInternals(*modules, clientapp_runtime=clientapp[0])
