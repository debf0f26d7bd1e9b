"""Record-level DP inside a silo: DP-SGD on every local step, and the silo's own accountant.

Each local step Poisson-samples the silo's records (each joins with probability q = batch-size / n,
from secret coins), Opacus computes every sampled record's gradient (or, with ghost clipping,
only its norm), each is clipped to ``record-clip-norm`` C, and the sum gets Gaussian noise of std
sigma * C from :mod:`plateau.privacy.noise` (a fresh OS key per step, untruncated float64
Gaussians: Opacus' own ``torch.normal`` noise has the 32-bit seed and the truncated tail that the
client-level layer left behind). The step's gradient is the noisy sum over the expected batch
q * n = batch-size, a public constant.

A local rule that queries the data twice per step (SAM-style: the gradient, then the gradient at
the ascent point, on the same sampled records) releases two noisy sums; together they are one
subsampled Gaussian mechanism of sensitivity sqrt(2) C and noise sigma C, accounted as noise
multiplier sigma / sqrt(2) per step. Everything else a rule does (momentum, control variates,
proximal terms, the global direction) is post-processing of public or already private values.

Which n, and which adjacency (README "Record-level DP"):

* a silo that declares ``record-public-size`` (a public lower bound on its count) samples at
  q = batch-size / public size and takes its delta from that number: every figure it reports
  comes from public numbers (its update, a sum over its records, still grows with how many it
  has), and its epsilon holds under **add/remove** (Opacus' accountants);
* otherwise q and delta come from its own count n_i, which then shapes what the silo sends;
  add/remove neighbours differ in n_i, so the epsilon is accounted under **substitution** (one
  record replaced, n_i fixed) by dp-accounting's PLD accountant (REPLACE_ONE). Under client-level
  DP such a silo keeps its numbers to itself: the server learns only whether it is within budget.

The silo's delta is its own (``max-record-delta``); a run's ``record-delta`` can only lower it.
The silo's ledger (:class:`LedgerFile`) is locked from the budget check to the charge, and a
round's planned steps are reserved before training, so concurrent runs sharing one silo's data
can never spend its budget twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import secrets
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plateau.config import RunConfig
from plateau.durable import sync_directory
from plateau.privacy.noise import NoiseSource, add_noise
from plateau.privacy.silo_policy import NodeConfigError, SiloPolicy

LEDGER_KEY = "record-dp/ledger"  # the silo's accountant history in Context.state
ADD_REMOVE = "add/remove"
SUBSTITUTION = "substitution"
# RDP orders: Opacus' defaults stop at 63, too low for the few, lightly noised steps of a silo
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [
    80, 96, 128, 192, 256, 384, 512, 768, 1024]
# dp-accounting's PLD grid for substitution: pessimistic rounding, so epsilon is an upper bound
PLD_DISCRETISATION = 1e-3
SUBSTITUTION_ACCOUNTANT = "pld (dp-accounting, REPLACE_ONE)"
Grads = list[torch.Tensor]
Entry = tuple[float, float, int, str]  # step noise multiplier, sample rate, steps, adjacency
NO_POLICY = SiloPolicy()  # a node config without record-level keys


def accountant_name(adjacency: str, accountant: str) -> str:
    """The accountant a ledger of this adjacency is measured with."""
    return accountant if adjacency == ADD_REMOVE else SUBSTITUTION_ACCOUNTANT


def silo_delta(config: RunConfig, size: int, policy: SiloPolicy = NO_POLICY) -> float:
    """The delta the silo checks its budget and reports at: its own (``max-record-delta``, or
    min(1e-5, 0.01 / n) for the n its plan uses), lowered by the run's record-delta if set. The
    server can only ask for a smaller delta, never a larger one."""
    own = policy.silo_delta(size)
    return min(own, config.record_delta) if config.record_delta > 0 else own


@functools.lru_cache(maxsize=512)
def substitution_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Epsilon of Poisson-subsampled Gaussian steps under substitution (REPLACE_ONE), by
    dp-accounting's PLD accountant with pessimistic discretisation (an upper bound)."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    accountant = PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE,
                               value_discretization_interval=PLD_DISCRETISATION)
    for sigma, rate, steps in history:
        accountant.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)),
            steps))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def calibrated_multiplier(target: float, delta: float, sample_rate: float, steps: int,
                          accountant: str, adjacency: str = ADD_REMOVE) -> float:
    """The smallest step noise multiplier (1% tolerance, from above) whose epsilon after
    ``steps`` steps at ``sample_rate`` stays <= ``target``: Opacus' search under add/remove,
    a bisection on the PLD accountant under substitution."""
    if adjacency == SUBSTITUTION:
        low, high = 0.05, 1.0
        while substitution_epsilon(((high, sample_rate, steps),), delta) > target:
            low, high = high, high * 2
            if high > 1e4:  # no rate in the text: it is a function of the record count
                raise NodeConfigError(f"record-target-epsilon={target:g} cannot be met over "
                                      f"{steps} steps at this silo's sampling rate")
        while high - low > 0.005 * high:
            middle = (low + high) / 2
            if substitution_epsilon(((middle, sample_rate, steps),), delta) > target:
                low = middle
            else:
                high = middle
        return high
    from opacus.accountants.utils import get_noise_multiplier

    extra = {"alphas": RDP_ORDERS} if accountant == "rdp" else {}
    with warnings.catch_warnings():  # the search tries huge sigmas, best at the largest order
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=accountant, epsilon_tolerance=0.01,
                                          **extra))


@dataclass(frozen=True)
class RecordPlan:
    """What one silo does on every local step of a round, and at what privacy."""

    clip_norm: float
    noise_multiplier: float  # per gradient query: noise std on the sum is this * clip_norm
    queries_per_step: int  # noisy sums released per step, all on the same sampled records
    sample_rate: float  # q = batch-size / records
    records: int  # the count q and delta come from: the public size, or the silo's own count
    delta: float
    accountant: str
    adjacency: str = SUBSTITUTION
    batch_size: int = 0  # the public divisor of each step's noisy sum; 0: q * records

    @property
    def step_noise_multiplier(self) -> float:
        """The whole step as one subsampled Gaussian: sensitivity sqrt(k) C, noise sigma C."""
        return self.noise_multiplier / math.sqrt(self.queries_per_step)

    @property
    def expected_batch(self) -> float:
        """batch-size: the public constant the noisy sum is divided by (q * records, unless a
        silo with fewer records than a batch samples every record, q = 1)."""
        return float(self.batch_size) if self.batch_size else self.sample_rate * self.records

    def entry(self, steps: int) -> Entry:
        """``steps`` steps of this plan as a ledger entry."""
        return (self.step_noise_multiplier, self.sample_rate, steps, self.adjacency)


def plan_for(config: RunConfig, records: int, queries_per_step: int,
             policy: SiloPolicy = NO_POLICY) -> RecordPlan:
    """The silo's plan: q = min(1, batch-size / n) and delta from its declared public size
    (add/remove) or from its own record count (substitution), and sigma either given or
    calibrated so that num-server-rounds rounds of local-steps steps (every round, the worst
    case) stay within record-target-epsilon. A silo with fewer records than a batch samples
    them all (q = 1, no amplification) rather than refuse: a refusal would tell the server
    that its count is below the batch size the server chose. Error texts carry no number
    computed from the record count."""
    public = policy.record_public_size
    if public and public > records:
        raise NodeConfigError(f"node config record-public-size={public} is above this silo's "
                              "record count: a public size must be a lower bound")
    size = public or records
    adjacency = ADD_REMOVE if public else SUBSTITUTION
    rate = min(1.0, config.batch_size / size)
    delta = silo_delta(config, size, policy)
    # checked at the silo's own delta, which the server cannot move: a check the server could
    # steer (through record-delta) would answer its questions about the count. At delta >= 1/n
    # "publish one record at random" is (0, delta)-DP: no guarantee at all
    if public and policy.silo_delta(public) * records >= 1.0:
        raise NodeConfigError(
            f"record-public-size={public} gives delta={policy.silo_delta(public):g}, not below "
            "1/n for this silo's record count (at delta >= 1/n, publishing one record at random "
            "is private): set max-record-delta well below 1/n, or declare a public size closer "
            "to the count")
    sigma = config.record_noise_multiplier
    if config.record_target_epsilon > 0:
        steps = config.num_server_rounds * config.local_steps
        sigma = calibrated_multiplier(config.record_target_epsilon, delta, rate, steps,
                                      config.record_accountant, adjacency
                                      ) * math.sqrt(queries_per_step)
    return RecordPlan(clip_norm=config.record_clip_norm, noise_multiplier=sigma,
                      queries_per_step=queries_per_step, sample_rate=rate, records=size,
                      delta=delta, accountant=accountant_name(adjacency,
                                                              config.record_accountant),
                      adjacency=adjacency, batch_size=config.batch_size)


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str
                   ) -> float:
    """Epsilon of a history of (noise multiplier, sample rate, steps) by Opacus' accountant
    (add/remove)."""
    return _opacus_epsilon(tuple(history), delta, accountant)


@functools.lru_cache(maxsize=512)
def _opacus_epsilon(history: tuple[tuple[float, float, int], ...], delta: float,
                    accountant: str) -> float:
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    if accountant == "prv":
        meter = PRVAccountant()
        meter.history = list(history)
        return float(meter.get_epsilon(delta))
    meter = RDPAccountant()
    meter.history = list(history)
    return float(meter.get_epsilon(delta, alphas=RDP_ORDERS))


@dataclass
class SiloLedger:
    """The silo's own record of every noisy step it took, and of the steps runs have reserved
    and not yet settled. It lives in the SuperNode's Context.state (a new ClientApp process or
    trainer sees it) and, when the node config names a ``record-ledger`` file, on the node's
    disk (a restarted or new run composes with it: the budget is the data's, not the run's)."""

    history: list[Entry] = field(default_factory=list)
    reserved: dict[str, Entry] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """Steps taken and reserved."""
        return sum(e[2] for e in self.history) + sum(e[2] for e in self.reserved.values())

    @property
    def adjacency(self) -> str:
        """Add/remove only when every step was sampled from a public size; one step sampled
        from the silo's own count makes the whole history substitution."""
        entries = [*self.history, *self.reserved.values()]
        if entries and all(e[3] == ADD_REMOVE for e in entries):
            return ADD_REMOVE
        return SUBSTITUTION

    def epsilon(self, delta: float, accountant: str) -> float:
        """Epsilon of everything taken and reserved, under the history's adjacency."""
        entries = [*self.history, *self.reserved.values()]
        plain = [(sigma, rate, steps) for sigma, rate, steps, _ in entries]
        if self.adjacency == ADD_REMOVE:
            return opacus_epsilon(plain, delta, accountant)
        return substitution_epsilon(tuple(plain), delta)

    def after(self, plan: RecordPlan, steps: int) -> SiloLedger:
        """The ledger once ``steps`` more steps of ``plan`` are taken."""
        entry = plan.entry(steps)
        history = list(self.history)
        if history and (history[-1][:2], history[-1][3]) == (entry[:2], entry[3]):
            last = history[-1]
            history[-1] = (last[0], last[1], last[2] + steps, last[3])
        else:
            history.append(entry)
        return SiloLedger(history, dict(self.reserved))

    def to_state(self, reserved: bool = True) -> dict[str, Any]:
        """The ledger as JSON-able lists; ``reserved=False`` for Context.state (whose records
        hold flat lists only: reservations live in the shared file)."""
        state: dict[str, Any] = {
            "noise": [h[0] for h in self.history], "rate": [h[1] for h in self.history],
            "steps": [h[2] for h in self.history], "adjacency": [h[3] for h in self.history]}
        if reserved:
            state["reserved"] = {key: list(entry) for key, entry in self.reserved.items()}
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> SiloLedger:
        if not state:
            return cls()
        noise, rate, steps = (list(state[k]) for k in ("noise", "rate", "steps"))
        # a ledger written before adjacency was recorded sampled from the silo's own count
        adjacency = list(state.get("adjacency") or [SUBSTITUTION] * len(noise))
        if not len(noise) == len(rate) == len(steps) == len(adjacency):
            raise ValueError("the silo's record-dp ledger is corrupt (lists of unequal length)")
        if any(a not in (ADD_REMOVE, SUBSTITUTION) for a in adjacency):
            raise ValueError("the silo's record-dp ledger is corrupt (unknown adjacency)")
        reserved = {str(k): (float(v[0]), float(v[1]), int(v[2]), str(v[3]))
                    for k, v in dict(state.get("reserved") or {}).items()}
        return cls([(float(n), float(r), int(s), str(a))
                    for n, r, s, a in zip(noise, rate, steps, adjacency, strict=True)], reserved)

    @classmethod
    def load(cls, path: Path) -> SiloLedger:
        if not path.exists():
            return cls()
        try:
            return cls.from_state(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"record-ledger={str(path)!r} cannot be read ({err}); the silo "
                             "refuses to train rather than forget what it spent") from None

    def save(self, path: Path) -> None:
        """Atomically (write, fsync, rename): a crash leaves the old or the new ledger."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
        with temporary.open("w") as handle:
            json.dump(self.to_state(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
        sync_directory(path.parent)

    def merged(self, other: SiloLedger) -> SiloLedger:
        """The longer of two histories of the same silo (one is a prefix of the other when
        the Context and the disk agree; otherwise the larger spend, never the smaller), with
        every reservation either holds."""
        longer = max(self, other, key=lambda ledger: sum(e[2] for e in ledger.history))
        return SiloLedger(list(longer.history), {**self.reserved, **other.reserved})


class LedgerFile:
    """A silo's ledger on disk, shared by every run and process that uses the silo's data.

    Every change happens under an exclusive ``flock`` on ``<file>.lock`` (the ledger itself is
    replaced by rename, so it cannot carry the lock): a round reserves its planned steps under
    the lock before it trains, and settles or cancels the reservation under the lock after.
    Two runs can therefore never both pass the budget check on the same spend. A reservation
    whose process died is never cancelled: it stays counted, erring on the side of the records.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def locked(self) -> Iterator[SiloLedger]:
        """The ledger, read under the lock; whatever the block leaves in it is saved."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                ledger = SiloLedger.load(self.path)
                before = ledger.to_state()
                yield ledger
                if ledger.to_state() != before:
                    ledger.save(self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def new_reservation() -> str:
        return f"{os.getpid()}-{secrets.token_hex(8)}"


def per_record_refusal(model: nn.Module) -> str | None:
    """Why record-level DP cannot train ``model``, naming the layer, or None: a layer Opacus'
    validator refuses (BatchNorm mixes the records of a batch), or a floating-point buffer
    (statistics of the records that would travel unclipped and un-noised)."""
    from opacus.validators import ModuleValidator

    layers = [(name, module) for name, module in model.named_modules()
              if not any(module.children())]
    for name, module in [*layers, ("", model)]:
        errors = ModuleValidator.validate(module, strict=False)
        if errors:
            reason = str(errors[0]).split(". ")[0][:200]
            where = f"layer {name!r} ({type(module).__name__})" if name else "the model"
            return f"Opacus refuses {where}: {reason}"
    buffers = [name for name, buffer in model.named_buffers() if buffer.is_floating_point()]
    if buffers:
        return (f"buffer {buffers[0]!r} holds statistics of the records, which would leave "
                "the silo without clipping or noise")
    return None


def per_sample_module(model: nn.Module, mode: str, clip_norm: float) -> nn.Module:
    """Opacus' per-sample machinery around ``model`` (hooks on its layers; the parameters are
    the model's own tensors)."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    if mode == "ghost":
        return GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="sum", max_grad_norm=clip_norm,
            use_ghost_clipping=True, strict=False)
    return GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)


def unsupported_layers(model: nn.Module) -> list[str]:
    """Trainable layers Opacus has no per-sample rule for (it would fall back to functorch)."""
    from opacus import GradSampleModule

    return sorted({type(module).__name__ for module in model.modules()
                   if any(p.requires_grad for p in module.parameters(recurse=False))
                   and not GradSampleModule.is_supported(module)})


class RecordPrivatiser:
    """DP-SGD's per-step work for one silo and one round: sampled batches and noisy clipped
    gradient sums. It counts the steps and the noisy queries of every step, so the round is
    accounted for exactly what was released (never more steps than the silo reserved, never
    more queries than the plan)."""

    def __init__(self, wrapped: nn.Module, plan: RecordPlan, mode: str,
                 source: NoiseSource, max_steps: int | None = None) -> None:
        self.wrapped, self.plan, self.mode, self.source = wrapped, plan, mode, source
        self.max_steps = max_steps
        self.steps = 0
        self.queries_this_step = 0

    def batches(self, x: torch.Tensor, y: torch.Tensor, steps: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` Poisson samples of the silo's records (secret coins, one per record)."""
        coins = torch.empty(len(y), dtype=torch.float64)
        for _ in range(steps):
            if self.max_steps is not None and self.steps >= self.max_steps:
                raise RuntimeError(f"a round asked for more than the {self.max_steps} "
                                   "record-level steps the silo reserved on its ledger")
            chosen = torch.nonzero(self.source.uniform_(coins) < self.plan.sample_rate)
            index = chosen.reshape(-1).to(y.device)
            self.steps += 1
            self.queries_this_step = 0
            yield x[index], y[index]

    def gradients(self, params: Grads, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[Grads, torch.Tensor | None]:
        """(noisy clipped gradient sum / expected batch, mean loss or None for an empty
        sample): one noisy query on this step's records."""
        self.queries_this_step += 1
        if self.queries_this_step > self.plan.queries_per_step:
            raise RuntimeError(f"a local step made {self.queries_this_step} gradient queries; "
                               f"the silo accounted for {self.plan.queries_per_step}")
        loss = None
        if len(y) == 0:
            summed = [torch.zeros_like(p) for p in params]
        else:
            losses = F.cross_entropy(self.wrapped(x), y, reduction="none")
            loss = losses.detach().mean()
            with warnings.catch_warnings():  # Opacus' hooks see inputs without gradients: fine
                warnings.filterwarnings("ignore", "Full backward hook is firing")
                summed = (self._ghost_sum(params, losses) if self.mode == "ghost"
                          else self._hooks_sum(params, losses))
        std = self.plan.noise_multiplier * self.plan.clip_norm
        scale = 1.0 / self.plan.expected_batch
        return [add_noise(s, std, self.source).mul_(scale) for s in summed], loss

    def _hooks_sum(self, params: Grads, losses: torch.Tensor) -> Grads:
        for p in params:  # nothing left over from another backward pass
            p.grad_sample = None
        torch.autograd.grad(losses.sum(), params)
        per_sample = [p.grad_sample for p in params]
        for p in params:
            p.grad_sample = None
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in per_sample]).norm(dim=0)
        factor = (self.plan.clip_norm / (norms + 1e-6)).clamp(max=1.0)
        return [torch.einsum("n,n...->...", factor, g) for g in per_sample]

    def _ghost_sum(self, params: Grads, losses: torch.Tensor) -> Grads:
        torch.autograd.grad(losses.sum(), params, retain_graph=True)
        factor = self.wrapped.get_clipping_coef().detach()  # C / (norm + 1e-6), at most 1
        self.wrapped.disable_hooks()
        try:
            return list(torch.autograd.grad((factor * losses).sum(), params))
        finally:
            self.wrapped.enable_hooks()
