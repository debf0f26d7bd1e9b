"""Record-level DP inside a silo: DP-SGD on every local step, and the silo's own accountant.

Each local step Poisson-samples the silo's records (each joins with probability
q = batch-size / n_i, from secret coins), Opacus computes every sampled record's gradient (or,
with ghost clipping, only its norm), each is clipped to ``record-clip-norm`` C, and the sum gets
Gaussian noise of std sigma * C from :mod:`plateau.privacy.noise` (a fresh OS key per step,
untruncated float64 Gaussians: Opacus' own ``torch.normal`` noise has the 32-bit seed and the
truncated tail that the client-level layer left behind). The step's gradient is the noisy sum
over the expected batch q * n_i, as in Opacus.

A local rule that queries the data twice per step (SAM-style: the gradient, then the gradient at
the ascent point, on the same sampled records) releases two noisy sums; together they are one
subsampled Gaussian mechanism of sensitivity sqrt(2) C and noise sigma C, accounted as noise
multiplier sigma / sqrt(2) per step. Everything else a rule does (momentum, control variates,
proximal terms, the global direction) is post-processing of public or already private values.

Adjacency: adding or removing one record of the silo (Opacus' accountants); the silo's record
count n_i is treated as public, as Opacus does (it sets q and the normalisation). The silo's
epsilon covers everything it sends: the update is post-processing of the noisy gradients.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plateau.config import RunConfig
from plateau.privacy.noise import NoiseSource, add_noise

LEDGER_KEY = "record-dp/ledger"  # the silo's accountant history in Context.state
# RDP orders: Opacus' defaults stop at 63, too low for the few, lightly noised steps of a silo
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [
    80, 96, 128, 192, 256, 384, 512, 768, 1024]
Grads = list[torch.Tensor]


def silo_delta(config: RunConfig, records: int) -> float:
    """The silo's delta: record-delta, or min(1e-5, 0.01 / n_i), well below 1/n_i."""
    return config.record_delta or min(1e-5, 0.01 / max(records, 1))


@functools.lru_cache(maxsize=64)
def calibrated_multiplier(target: float, delta: float, sample_rate: float, steps: int,
                          accountant: str) -> float:
    """The smallest step noise multiplier (Opacus' search, 1% tolerance, from above) whose
    epsilon after ``steps`` steps at ``sample_rate`` stays <= ``target``."""
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
    sample_rate: float  # q = batch-size / n_i
    records: int
    delta: float
    accountant: str

    @property
    def step_noise_multiplier(self) -> float:
        """The whole step as one subsampled Gaussian: sensitivity sqrt(k) C, noise sigma C."""
        return self.noise_multiplier / math.sqrt(self.queries_per_step)

    @property
    def expected_batch(self) -> float:
        return self.sample_rate * self.records


def plan_for(config: RunConfig, records: int, queries_per_step: int) -> RecordPlan:
    """The silo's plan: its own q and delta, and sigma either given or calibrated so that
    num-server-rounds rounds of local-steps steps (every round, the worst case) stay within
    record-target-epsilon."""
    if config.batch_size >= records:
        raise ValueError(f"batch-size={config.batch_size} is not below this silo's {records} "
                         "records: record-level sampling needs q = batch-size / n_i < 1")
    rate = config.batch_size / records
    delta = silo_delta(config, records)
    sigma = config.record_noise_multiplier
    if config.record_target_epsilon > 0:
        steps = config.num_server_rounds * config.local_steps
        sigma = calibrated_multiplier(config.record_target_epsilon, delta, rate, steps,
                                      config.record_accountant) * math.sqrt(queries_per_step)
    return RecordPlan(clip_norm=config.record_clip_norm, noise_multiplier=sigma,
                      queries_per_step=queries_per_step, sample_rate=rate, records=records,
                      delta=delta, accountant=config.record_accountant)


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str
                   ) -> float:
    """Epsilon of a history of (noise multiplier, sample rate, steps) by Opacus' accountant."""
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
    """The silo's own record of every noisy step it took, in Opacus' history format. It lives
    in the SuperNode's Context.state (a new ClientApp process or trainer sees it) and, when the
    node config names a ``record-ledger`` file, on the node's disk (a restarted or new run
    composes with it: the budget is the data's, not the run's). Only epsilon ever leaves."""

    history: list[tuple[float, float, int]] = field(default_factory=list)

    def epsilon(self, delta: float, accountant: str) -> float:
        return opacus_epsilon(self.history, delta, accountant)

    def after(self, plan: RecordPlan, steps: int) -> SiloLedger:
        """The ledger once ``steps`` more steps of ``plan`` are taken."""
        entry = (plan.step_noise_multiplier, plan.sample_rate)
        history = list(self.history)
        if history and history[-1][:2] == entry:
            history[-1] = (*entry, history[-1][2] + steps)
        else:
            history.append((*entry, steps))
        return SiloLedger(history)

    def to_state(self) -> dict[str, list[float] | list[int]]:
        return {"noise": [h[0] for h in self.history], "rate": [h[1] for h in self.history],
                "steps": [h[2] for h in self.history]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> SiloLedger:
        if not state:
            return cls()
        noise, rate, steps = (list(state[k]) for k in ("noise", "rate", "steps"))
        if not len(noise) == len(rate) == len(steps):
            raise ValueError("the silo's record-dp ledger is corrupt (lists of unequal length)")
        return cls([(float(n), float(r), int(s)) for n, r, s in zip(noise, rate, steps,
                                                                     strict=True)])

    @classmethod
    def load(cls, path: Path) -> SiloLedger:
        if not path.exists():
            return cls()
        try:
            return cls.from_state(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"record-ledger={str(path)!r} cannot be read ({err}); the silo "
                             "refuses to train rather than forget what it spent") from None

    def save(self, path: Path) -> None:
        """Atomically (write, fsync, rename): a crash leaves the old or the new ledger."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        with temporary.open("w") as handle:
            json.dump(self.to_state(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)

    def merged(self, other: SiloLedger) -> SiloLedger:
        """The longer of two histories of the same silo (one is a prefix of the other when
        the Context and the disk agree; otherwise the larger spend, never the smaller)."""
        return max(self, other, key=lambda ledger: sum(s for _, _, s in ledger.history))


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
    gradient sums. It counts the noisy queries of every step, so the round is accounted for
    exactly what was released (never fewer queries than the plan)."""

    def __init__(self, wrapped: nn.Module, plan: RecordPlan, mode: str,
                 source: NoiseSource) -> None:
        self.wrapped, self.plan, self.mode, self.source = wrapped, plan, mode, source
        self.steps = 0
        self.queries_this_step = 0

    def batches(self, x: torch.Tensor, y: torch.Tensor, steps: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` Poisson samples of the silo's records (secret coins, one per record)."""
        coins = torch.empty(len(y), dtype=torch.float64)
        for _ in range(steps):
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
