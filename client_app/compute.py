"""The ClientApp's work: K local steps from the global model, then the clipped, noised release.

It runs in whichever process does the training: the ClientApp process Flower starts (no
``trainer-socket`` in the node config), or the node's warm trainer (``node.trainer``), which
keeps torch, the models and the partitions loaded between rounds. Either way the node policy has
already been enforced by the ClientApp process (``client_app.app``) before anything reaches here,
and the noise is drawn here, per release, from :func:`plateau.privacy.noise.secure_source`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import log
from torch import nn

from plateau import messages
from plateau.config import LOCAL_DATASET, RunConfig
from plateau.data import Tensors as DataTensors
from plateau.data import client_partition, dataset_info
from plateau.data import prepare as prepare_tensors
from plateau.device import resolve_device
from plateau.errors import DataError
from plateau.local import LocalTask
from plateau.models import (
    float_buffer_names,
    frozen_digest,
    input_spec,
    load_travelling,
    model_from_config,
    score,
)
from plateau.privacy.mechanism import (
    Tensors,
    flat_norm,
    mechanism_from_config,
    random_support,
)
from plateau.privacy.noise import secure_source, test_seed
from plateau.privacy.record_dp import (
    ADD_REMOVE,
    LEDGER_KEY,
    SUBSTITUTION,
    LedgerFile,
    RecordPlan,
    RecordPrivatiser,
    SiloLedger,
    per_record_refusal,
    per_sample_module,
    plan_for,
)
from plateau.privacy.silo_policy import SiloPolicy
from plateau.seeds import stream_generator
from plateau.silo_data import (
    LocalSpec,
    SiloData,
    SiloDataError,
    load_silo,
    local_spec,
    silo_path,
)
from strategies import LOCAL_RULES

from .node_state import clear, load_before, save_after, state_folder
from .policy import NodeConfigError, count_public, evaluation_published, partition_of

STATE_ROUNDS = "rounds"  # how many rounds this node's algorithm state has accumulated
STATE_RUN_KEY = "node-state"  # the Flower run whose algorithm state this node's files hold
DEFAULT_EVAL_FRACTION = 0.1  # of a silo's records held out, unless its node config says
EVALUATED_KEY = "silo-evaluated"  # the run and round of this silo's last evaluation
SILO_STATE_KEY = "silo-data"  # the fingerprint of the silo's files when the run first read them


@functools.lru_cache(maxsize=4)
def _model(cfg: RunConfig, device: torch.device) -> tuple[nn.Module, str]:
    """One model per configuration and process, with the digest of its frozen weights: frozen
    weights are loaded once per worker, the travelling ones every round."""
    model = model_from_config(cfg).to(device)
    return model, frozen_digest(model)


PER_SAMPLE_ATTRIBUTE = "_plateau_per_sample"


def _per_sample(cfg: RunConfig, device: torch.device) -> nn.Module:
    """The configuration's model inside Opacus' per-sample machinery (record-level DP). The
    wrapper lives on the model object itself, outside its modules and state_dict: a separate
    cache could outlive the model's entry and hand back a wrapper around an evicted model
    (whose parameters are not the ones being trained), or wrap one model twice."""
    model, _ = _model(cfg, device)
    wrapped = model.__dict__.get(PER_SAMPLE_ATTRIBUTE)
    if wrapped is None:
        wrapped = per_sample_module(model, cfg.record_per_sample, cfg.record_clip_norm)
        model.__dict__[PER_SAMPLE_ATTRIBUTE] = wrapped
    return wrapped


@functools.lru_cache(maxsize=512)
def _partition_on(cfg: RunConfig, pid: int, num: int, device: torch.device) -> DataTensors:
    """This node's training tensors, already on the training device."""
    return client_partition(
        cfg.dataset, test_fraction=cfg.test_fraction, seed=cfg.seed, num_partitions=num,
        partition_id=pid, partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha,
        classes_per_client=cfg.classes_per_client, spec=input_spec(cfg),
        validation_fraction=cfg.validation_fraction, min_size=cfg.min_partition_size,
    ).to(device)


def silo_files(cfg: RunConfig, node_config: Mapping[str, Any],
               partition_id: int) -> tuple[Path, Path | None]:
    """This silo's data and held-out files: the node config's ``data`` and ``eval-data``
    (a deployment), else partition i's entry of the run's data-dir (a simulation)."""
    held_out = node_config.get("eval-data")
    eval_path = Path(str(held_out)).expanduser() if held_out else None
    if node_config.get("data"):
        return Path(str(node_config["data"])).expanduser(), eval_path
    if cfg.data_dir:
        return silo_path(cfg.data_dir, partition_id), eval_path
    raise SiloDataError("dataset='local' and this SuperNode names no data: start it with "
                        "--node-config \"data=<file or folder>\" (or set data-dir in a "
                        "simulation)")


def silo_spec(cfg: RunConfig, node_config: Mapping[str, Any]) -> LocalSpec:
    """How this silo reads its data: the run's spec, with the held-out split the silo's own
    (node config ``eval-seed``, default 0, and ``eval-fraction``, default 0.1). The run does not
    choose it: a server could otherwise move records between the held-out set, which
    evaluation exposes with no epsilon, and the training set, within a run or across runs."""
    try:
        seed = int(node_config.get("eval-seed", 0))
        fraction = float(node_config.get("eval-fraction", DEFAULT_EVAL_FRACTION))
    except (TypeError, ValueError):
        raise NodeConfigError("eval-seed must be an integer and eval-fraction a number in "
                              "[0, 0.5]") from None
    if not 0 <= fraction <= 0.5 or seed < 0:
        raise NodeConfigError(f"eval-fraction={fraction:g}, eval-seed={seed}: expected a "
                              "fraction in [0, 0.5] and a seed >= 0")
    return dataclasses.replace(local_spec(cfg), seed=seed, eval_fraction=fraction)


def silo(cfg: RunConfig, context: Context) -> SiloData:
    """This silo's own data, checked against what the run agreed on: the same files as when
    the run first read them (a file changed mid-run would train on records the schema check
    never saw), and the input shape the server resolved from every silo's schema."""
    pid, _ = partition_of(context)
    path, eval_path = silo_files(cfg, context.node_config, pid)
    spec = silo_spec(cfg, context.node_config)
    data = load_silo(path, spec, eval_path=eval_path)
    # what the run may not change mid-run (num-classes aside: the server resolves it from the
    # schemas after the first reading, and under DP it is declared from the start)
    pinned = dataclasses.replace(spec, num_classes=0)
    reading = hashlib.sha256(repr((pinned, str(path), str(eval_path))).encode()).hexdigest()[:16]
    first = context.state.config_records.get(SILO_STATE_KEY)
    if first is None or first.get("run") != context.run_id:
        context.state[SILO_STATE_KEY] = ConfigRecord({"stamp": data.schema.stamp,
                                                      "reading": reading,
                                                      "run": context.run_id})
    elif first.get("stamp") != data.schema.stamp:
        raise SiloDataError("this silo's files changed since the run first read them (their "
                            "fingerprint differs): the schema check never saw them; start a "
                            "new run to use them")
    elif first.get("reading") != reading:
        # a server that changed how the records are read mid-run (label-names, columns, ...)
        # could learn from each refusal or evaluation: the run keeps its first reading
        raise SiloDataError("the run asks to read this silo's data differently from its "
                            "first message (data keys of the run config changed mid-run)")
    shape = "x".join(str(d) for d in data.schema.input_shape)
    if cfg.input_shape and data.schema.input_shape and shape != cfg.input_shape:
        raise SiloDataError(f"this silo's data gives input shape {shape}, the run agreed on "
                            f"{cfg.input_shape}")
    return data


def _resolved(cfg: RunConfig) -> bool:
    """Whether the model is known (dataset='local': once the server resolved the schema)."""
    try:
        dataset_info(cfg)
    except DataError:
        return False
    return True


@functools.lru_cache(maxsize=16)
def _silo_tensors(cfg: RunConfig, spec: LocalSpec, path: Path, eval_path: Path | None,
                  stamp: str, held_out: bool, device: torch.device) -> DataTensors:
    """A silo's training (or held-out) tensors, once per process and version of its files."""
    data = load_silo(path, spec, eval_path=eval_path)
    return prepare_tensors(data.held_out if held_out else data.train, dataset_info(cfg),
                           input_spec(cfg)).to(device)


def _local_tensors(cfg: RunConfig, context: Context, device: torch.device,
                   held_out: bool = False) -> DataTensors:
    data = silo(cfg, context)
    pid, _ = partition_of(context)
    path, eval_path = silo_files(cfg, context.node_config, pid)
    return _silo_tensors(cfg, silo_spec(cfg, context.node_config), path, eval_path,
                         data.schema.stamp, held_out, device)


def training_data(cfg: RunConfig, context: Context, device: torch.device) -> DataTensors:
    """This node's training tensors: its partition of a bundled dataset, or its own files."""
    if cfg.dataset == LOCAL_DATASET:
        return _local_tensors(cfg, context, device)
    pid, num = partition_of(context)
    return _partition_on(cfg, pid, num, device)


def public_mask(round_config: Mapping[str, Any]) -> tuple[int, float] | None:
    """The round's public random subset of coordinates (seed, kept fraction in (0, 1]), when
    the server announced one."""
    seed, keep = round_config.get("mask-seed"), round_config.get("mask-keep")
    if seed is None:
        return None
    if not isinstance(keep, int | float) or not 0 < keep <= 1:
        raise ValueError(f"mask-keep={keep!r} with mask-seed: expected a fraction in (0, 1]")
    return int(seed), float(keep)


def local_round(task: LocalTask, rule: str, cohort: float,
                start_buffers: dict[str, torch.Tensor], mask: tuple[int, float] | None = None,
                noise_labels: tuple[int, ...] = ()) -> RecordDict:
    """Run a local rule, privatise what it releases, and build the reply's records.

    ``mask`` (FedSMP: seed, kept fraction) restricts the release to the round's public random
    subset of coordinates: the update is sparsified, then clipped, then noised on that subset only.
    ``noise_labels`` name the draw for the test-only seeded path (PLATEAU_TEST_SEED); otherwise
    the noise is keyed by the operating system.
    """
    config = task.config
    state_rounds = int(task.state.pop(STATE_ROUNDS, {"n": torch.zeros(())})["n"])
    released = LOCAL_RULES[rule].run(task)
    state = task.model.state_dict()
    buffers = {name: state[name] - start for name, start in start_buffers.items()}
    support = (random_support(released, mask[1], mask[0]) if mask is not None else None)
    # under record-level DP the count the silo's plan uses (its public size, or its own count,
    # which substitution accounting does not hide)
    metrics: dict[str, int | float] = {
        "num-examples": len(task.data) if task.record is None else task.record.plan.records}
    diagnostics = {"train-loss": task.mean_loss(), "state-rounds": state_rounds}
    if task.record is not None:  # the loss and the update's norm are not private per record
        diagnostics = {"state-rounds": state_rounds}
    if task.state:
        task.state[STATE_ROUNDS] = {"n": torch.tensor(state_rounds + 1)}
    mechanism = mechanism_from_config(config)
    if mechanism is None:
        if support is not None:
            released = {k: v * support[k] for k, v in released.items()}
        metrics |= diagnostics | {"update-norm": flat_norm(released)}
    else:
        released, report = mechanism.release(
            released, cohort, secure_source("client-noise", *noise_labels), support=support)
        # Under DP the data size is private (constant weight). Only in central placement, where
        # the server is trusted with the clipped updates anyway, does it also get diagnostics.
        metrics = {"num-examples": 1}
        if config.dp == "central" and task.record is None:
            metrics |= diagnostics | {"update-norm": report.norm,
                                      "clipped": int(report.clipped), "clip-error": report.error}
    if (mechanism is not None or task.record is not None) and test_seed() is not None:
        metrics["test-seeded"] = 1  # this node's noise is predictable: no epsilon holds
    return messages.train_reply(
        messages.tensors_record(released), metrics,
        messages.tensors_record(buffers) if buffers else None)


def prepare(cfg: RunConfig, context: Context) -> dict[str, Any] | None:
    """Load the model and this partition's tensors and run torch's first backward pass, so
    that round 1 costs what later rounds do. With dataset='local', return the silo's schema
    fingerprint (its record count only where no client-level DP hides it), or its error; the
    model is only built once the server has resolved the schema."""
    device = resolve_device(cfg.device)
    fingerprint = None
    if cfg.dataset == LOCAL_DATASET:
        private = cfg.dp_enabled or cfg.record_dp == "on"
        try:
            fingerprint = silo(cfg, context).schema.to_record(
                with_counts=count_public(cfg, context.node_config), with_labels=not private,
                with_eval_count=evaluation_published(cfg, context.node_config),
                exact_types=not private)
        except SiloDataError as err:
            log(WARNING, "this silo's data cannot be used: %s", err)
            # a reason may name a label value or a column's type: functions of the records
            return {"error": "its data cannot be used (under DP the reason stays in the "
                             "SuperNode's log)" if private else str(err)}
        if not _resolved(cfg):
            return fingerprint
    data = training_data(cfg, context, device)
    _warm(cfg, device, data.x[:cfg.batch_size], data.y[:cfg.batch_size])
    return fingerprint


def _warm(cfg: RunConfig, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward and backward pass on a batch, once per process and config, results
    discarded (the model's weights are not touched): torch sets up its kernels and allocator
    here rather than in round 1."""
    if len(y) == 0 or (cfg, device) in _WARMED:
        return
    model, _ = _model(cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params)
    _WARMED.add((cfg, device))


_WARMED: set[tuple[RunConfig, torch.device]] = set()


def requested_rule(round_config: Mapping[str, Any]) -> str:
    """The local rule the server named; one this client does not know is refused."""
    rule = str(round_config["local-rule"])
    if rule not in LOCAL_RULES:
        raise ValueError(f"unknown local rule {rule!r}; this client knows {sorted(LOCAL_RULES)}")
    return rule


def client_round(content: RecordDict, cfg: RunConfig, model: nn.Module, data: DataTensors, *,
                 state: dict[str, Tensors], generator: torch.Generator, num_partitions: int,
                 noise_labels: tuple[int, ...] = (),
                 record: RecordPrivatiser | None = None) -> tuple[RecordDict, LocalTask]:
    """One client's round from a train message's content: load the broadcast model, run the
    local rule the server named on ``data``, privatise and build the reply. The one path the
    ClientApp, the numpy-reference tests and the per-round benchmark share; ``state`` (the
    node's algorithm state) is updated in place."""
    round_config = content[messages.CONFIG_KEY]
    rule = requested_rule(round_config)
    load_travelling(model, content[messages.MODEL_KEY].to_torch_state_dict())
    model_state = model.state_dict()
    start_buffers = {name: model_state[name].detach().clone()
                     for name in float_buffer_names(model)}
    device = next(model.parameters()).device
    broadcast = {
        name: {k: v.to(device) for k, v in array_record.to_torch_state_dict().items()}
        for name, array_record in content.array_records.items() if name != "arrays"
    }
    task = LocalTask(model=model, data=data, config=cfg, lr=float(round_config["round-lr"]),
                     broadcast=broadcast, generator=generator, state=state, record=record)
    # A server claiming a larger cohort would shrink each client's distributed noise share;
    # the cohort can never exceed the population this node belongs to.
    cohort = min(float(round_config["expected-cohort"]), float(num_partitions))
    reply = local_round(task, rule, cohort, start_buffers, public_mask(round_config),
                        noise_labels=noise_labels)
    return reply, task


def train(content: RecordDict, context: Context) -> RecordDict:
    """The reply's content to a train message: the local rule the server asked for, run on
    this node's partition, and the released update (or a decline). Writes the node's algorithm
    state back into ``context.state``. Takes and returns the wire form (packed records)."""
    content = messages.unpack_content(content)
    round_config = content[messages.CONFIG_KEY]
    cfg = RunConfig.from_record(round_config)
    device = resolve_device(cfg.device)
    _, digest = _model(cfg, device)
    expected = str(round_config.get("frozen-digest", digest))
    if expected != digest:
        raise ValueError(f"this node's frozen weights (digest {digest}) differ from the "
                         f"server's ({expected}): same model files and library versions needed")
    try:
        data = training_data(cfg, context, device)
    except SiloDataError as err:
        log(WARNING, "declining: this silo's data cannot be used: %s", err)
        return messages.decline("silo-data")
    return messages.pack_content(train_on(content, context, data))


@torch.no_grad()
def evaluate(content: RecordDict, context: Context) -> RecordDict:
    """Federated evaluation: the global model on this silo's held-out records (never trained
    on), returned as sums (examples, correct, loss) the server weights by examples. Takes the
    wire form (a packed model)."""
    content = messages.unpack_content(content)
    cfg = RunConfig.from_record(content[messages.CONFIG_KEY])
    device = resolve_device(cfg.device)
    try:
        data = (_local_tensors(cfg, context, device, held_out=True)
                if cfg.dataset == LOCAL_DATASET else None)
    except SiloDataError as err:
        log(WARNING, "declining evaluation: this silo's data cannot be used: %s", err)
        return messages.decline("silo-data")
    if data is None:
        return messages.decline("no-held-out-data: a bundled dataset is evaluated centrally")
    if len(data) == 0:
        return messages.decline("no-held-out-data")
    server_round = int(content[messages.CONFIG_KEY].get("server-round", 0))
    done = context.state.config_records.get(EVALUATED_KEY)
    if done is not None and done.get("run") == context.run_id and (
            server_round <= int(done.get("round", 0)) or server_round > cfg.num_server_rounds):
        # one evaluation a round, rounds increasing: a server may not probe the held-out
        # records with as many crafted models as it likes
        return messages.decline("evaluation-replayed")
    context.state[EVALUATED_KEY] = ConfigRecord({"run": context.run_id, "round": server_round})
    model, _ = _model(cfg, device)
    load_travelling(model, content[messages.MODEL_KEY].to_torch_state_dict())
    correct, loss_sum = score(model, data.x, data.y)
    return messages.evaluation_reply(len(data), correct, loss_sum)


def train_on(content: RecordDict, context: Context, data: DataTensors) -> RecordDict:
    """``train`` on given records: the silo's whole round (its policy, budget, ledger, local
    rule, release and reply), which the record-level audit runs on records it chooses."""
    round_config = content[messages.CONFIG_KEY]
    cfg = RunConfig.from_record(round_config)
    server_round = int(round_config["server-round"])
    rule = requested_rule(round_config)
    pid, num = partition_of(context)
    device = resolve_device(cfg.device)
    model, _ = _model(cfg, device)
    if len(data) == 0:
        return messages.decline("no-data")
    silo = None
    if cfg.record_dp == "on":
        # the server chose the model: a layer that mixes or keeps statistics of the records
        # would release them outside the silo's epsilon (the server checks too; a silo trusts
        # only its own check)
        if (reason := per_record_refusal(model)) is not None:
            raise NodeConfigError(f"record-level DP cannot train model={cfg.model!r}: {reason}")
        silo = SiloRound.open(cfg, context, len(data), LOCAL_RULES[rule].backprops_per_step)
        if silo.refusal is not None:
            return messages.decline(silo.refusal)
    try:
        reply, task = client_round(
            content, cfg, model, data,
            state=_own_state(cfg, context, pid, server_round, device),
            generator=stream_generator(cfg.seed, "client-batches", server_round, pid),
            num_partitions=num, noise_labels=(server_round, pid),
            record=None if silo is None else RecordPrivatiser(
                _per_sample(cfg, device), silo.plan, cfg.record_per_sample,
                secure_source("record-noise", server_round, pid), max_steps=cfg.local_steps))
        save_state(context, cfg.algorithm, task.state)
        folder = state_folder(context.node_config, cfg.run_name, cfg.algorithm, pid)
        if folder is not None:
            if not cfg.resume and context.state.config_records.get(STATE_RUN_KEY, {}).get(
                    "run-id") != context.run_id:
                clear(folder)  # a fresh run of this name: an older run's state must not leak in
            context.state[STATE_RUN_KEY] = ConfigRecord({"run-id": context.run_id})
            save_after(folder, server_round, task.state)
        if silo is not None and task.record is not None:
            # charged before the reply leaves: what the server can see is always on the ledger
            silo.charge(context, task.record.steps)
            reply[messages.METRICS_KEY] = MetricRecord({**reply[messages.METRICS_KEY],
                                                        **silo.report(cfg)})
    except BaseException:
        if silo is not None:
            silo.cancel()  # nothing of this round left the silo
        raise
    return reply


@dataclass
class SiloRound:
    """One round of record-level DP on this silo: its policy (node config), its plan, its
    ledger (Context.state, and the node's locked ``record-ledger`` file if set) and its budget
    (the silo's ``max-record-epsilon`` and the run's record-target-epsilon, whichever is
    smaller), checked at the silo's delta. The round's planned steps are reserved on the file
    before training and settled (``charge``) or released (``cancel``) after."""

    policy: SiloPolicy
    plan: RecordPlan
    ledger: SiloLedger
    store: LedgerFile | None
    reservation: str | None = None
    refusal: str | None = None

    @classmethod
    def open(cls, cfg: RunConfig, context: Context, records: int,
             queries_per_step: int) -> SiloRound:
        policy = SiloPolicy.from_node_config(context.node_config)
        count_private = cfg.dp_enabled and not policy.record_public_size
        if count_private and policy.max_record_epsilon > 0:
            # its declines would depend on the count, at thresholds the server steers (the
            # run's sigma, steps and rounds): an oracle on the count, one free question a run
            raise NodeConfigError(
                "node config max-record-epsilon under client-level DP needs "
                "record-public-size=<a public lower bound on the record count>: without it, "
                "when the silo declines would tell the server its count")
        plan = plan_for(cfg, records, queries_per_step, policy)
        floor = policy.min_record_noise_multiplier
        if plan.noise_multiplier < floor:
            log(WARNING, "record-noise-multiplier %.4g of this silo's plan is below "
                "min-record-noise-multiplier=%g", plan.noise_multiplier, floor)
            raise NodeConfigError(  # no sigma in the text: calibrated, it reflects the count
                "the run's record-level noise for this silo is below this SuperNode's "
                f"min-record-noise-multiplier={floor:g}")
        store = LedgerFile(policy.record_ledger) if policy.record_ledger else None
        if cfg.resume and store is None:
            raise NodeConfigError(
                "a resumed run with record-level DP needs this silo's record-ledger file "
                "(node config record-ledger=<file>): Flower gives a resumed run a fresh "
                "Context.state, and the silo would forget what it has spent")
        silo = cls(policy, plan, SiloLedger.from_state(
            context.state.config_records.get(LEDGER_KEY)), store)
        if store is None:
            silo.refusal = silo._over_budget(silo.ledger, cfg)
            return silo
        with store.locked() as shared:
            if sum(e[2] for e in silo.ledger.history) > sum(e[2] for e in shared.history):
                shared.history = list(silo.ledger.history)  # the file lost what the node knows
            silo.refusal = silo._over_budget(shared, cfg)
            if silo.refusal is None:
                silo.reservation = store.new_reservation()
                shared.reserved[silo.reservation] = plan.entry(cfg.local_steps)
            silo.ledger = SiloLedger(list(shared.history), dict(shared.reserved))
        return silo

    def _over_budget(self, ledger: SiloLedger, cfg: RunConfig) -> str | None:
        """'record-budget' when this round's planned steps, on top of everything taken and
        reserved, would take the silo above its cap (at the silo's delta). Under client-level
        DP a silo whose plan uses its own count never declines (its own cap needs a public
        size: ``open``), and the run's record-target-epsilon only calibrates its sigma."""
        count_private = cfg.dp_enabled and not self.policy.record_public_size
        run_cap = 0.0 if count_private else cfg.record_target_epsilon
        caps = [c for c in (self.policy.max_record_epsilon, run_cap) if c > 0]
        if not caps:
            return None
        after = ledger.after(self.plan, cfg.local_steps).epsilon(self.plan.delta,
                                                                 self.plan.accountant)
        if after <= min(caps):
            return None
        log(WARNING, "record-level budget: this round would take the silo's epsilon to %.4f "
            "> %g (delta %g); declining", after, min(caps), self.plan.delta)
        return "record-budget"

    def charge(self, context: Context, steps: int) -> None:
        """Settle the round: its steps go on the ledger (file and state), its reservation
        goes. Done before the reply leaves: what the server can see is always on the ledger."""
        if self.store is None:
            self.ledger = self.ledger.after(self.plan, steps)
        else:
            with self.store.locked() as shared:
                shared.reserved.pop(self.reservation or "", None)
                shared.history = shared.after(self.plan, steps).history
                self.ledger = SiloLedger(list(shared.history), dict(shared.reserved))
        self.reservation = None
        context.state[LEDGER_KEY] = ConfigRecord(SiloLedger(self.ledger.history).to_state(
            reserved=False))

    def cancel(self) -> None:
        """Release the round's reservation: it ended before anything left the silo."""
        if self.store is not None and self.reservation is not None:
            with self.store.locked() as shared:
                shared.reserved.pop(self.reservation, None)
            self.reservation = None

    def report(self, cfg: RunConfig) -> dict[str, float | int]:
        """What the reply tells the server of the silo's record-level privacy. Numbers that
        depend on the silo's record count leave it only where that count is public anyway (a
        run without client-level DP, whose epsilon is then accounted under substitution) or by
        the silo's choice (``publish-record-epsilon``); a silo with ``record-public-size``
        whose every step was sampled at that public size's rate reports numbers computed from
        public ones. Under client-level DP otherwise: nothing (the reply itself says the silo
        is within its budget)."""
        public = self.policy.record_public_size
        from_public = public and self.ledger.adjacency == ADD_REMOVE  # every step at b/public
        if cfg.dp_enabled and not from_public and not self.policy.publish_record_epsilon:
            return {}
        report: dict[str, float | int] = {
            "record-epsilon": self.ledger.epsilon(self.plan.delta, self.plan.accountant),
            "record-delta": self.plan.delta,
            "record-noise-multiplier": self.plan.noise_multiplier,
            "record-steps": self.ledger.steps,
            "record-substitution": int(self.ledger.adjacency == SUBSTITUTION)}
        if public:
            report["record-public-size"] = public
        return report


def _own_state(cfg: RunConfig, context: Context, partition: int, server_round: int,
               device: torch.device) -> dict[str, Tensors]:
    """The node's algorithm state for this round: in a resumed run the node's own file from
    before this round (``client_app.node_state``), else what ``Context.state`` holds."""
    folder = state_folder(context.node_config, cfg.run_name, cfg.algorithm, partition)
    if cfg.resume and folder is not None:
        persisted = load_before(folder, server_round)
        if persisted is not None:
            return {name: {k: v.to(device) for k, v in tensors.items()}
                    for name, tensors in persisted.items()}
    return load_state(context, cfg.algorithm, device)


def load_state(context: Context, algorithm: str, device: torch.device) -> dict[str, Tensors]:
    """This node's algorithm state (SCAFFOLD's c_i, FedDyn's H_i, ...) from Context.state,
    which the SuperNode keeps across rounds. State of another algorithm is ignored."""
    prefix = f"{algorithm}/"
    return {
        name[len(prefix):]: {k: v.to(device) for k, v in record.to_torch_state_dict().items()}
        for name, record in context.state.array_records.items() if name.startswith(prefix)
    }


def save_state(context: Context, algorithm: str, state: dict[str, Tensors]) -> None:
    """Write the node's algorithm state back for the next round."""
    for name, tensors in state.items():
        context.state[f"{algorithm}/{name}"] = ArrayRecord(
            {k: v.detach().cpu() for k, v in tensors.items()})

