"""The in-run privacy audit: canary clients beside the real ones, and what the run's own
aggregates reveal about them.

``audit-canaries = k`` adds k canary clients to the population. They count in N and are sampled
like every other client, so the accounting is the run's own (for the real clients it describes
the same mechanism on a population of N + k). The audit scores the released sum with the
canaries in it; the model then moves by that sum without the canaries' clipped updates (which
the server knows: post-processing), over the real clients' share of the expected cohort, so the
real updates are not diluted by the canaries' slots (their noise shares stay in the sum).

Each canary owns a fixed random direction in the released space, drawn from a secret key; a fair
secret coin decides whether it is *inserted* (when sampled it releases 10C along its direction,
clipped to C) or *held out* (when sampled it releases a zero update: the null client of zero-out
adjacency). Either way its upload goes through the mechanism's own ``release`` (clip, its noise
share) and ``aggregate`` (top-up, central noise): no special case inside the mechanism. Real
clients see the canaries only through the model.

The auditor's score of a canary is the cosine between its direction and the sum of the round
aggregates released so far. From the scores it derives

* a lower bound on ε at the run's δ with 95 % confidence (Steinke, Nasr and Jagielski, "Privacy
  Auditing with One (1) Training Run", NeurIPS 2023): guess "inserted" for the r top-scoring
  canaries; v correct guesses are impossible for an (ε, δ)-DP mechanism unless
  P[Binomial(r, e^ε/(1+e^ε)) >= v] + 2kδ·max_i P[v > Binomial >= v - i]/i is large. A few r are
  tried, Bonferroni-corrected. It holds whatever the scores' distribution;
* an estimate of ε (Andrew et al., "One-shot Empirical Privacy Estimation for Federated
  Learning", ICLR 2024): the inserted and held-out scores are fitted with Gaussians of a common
  variance, and ε is that of the Gaussian mechanism whose shift is their standardised distance.
  It assumes the scores are Gaussian with a common variance (noise projected on random
  directions); it is an estimate, not a bound, and is None with fewer than 10 canaries on either
  side.

The score is the cosine of a canary's direction with the sum, or, when the canaries' directions
fit in the released space with room to spare (k <= d/2 and k*d <= 2e7), the canary's coefficient
in the least-squares fit of the sum on all k directions: the other canaries' contributions then
do not leak into each score (with d = 650 and 1,000 canaries their cross-talk is as large as a
canary's own signal). Either score ignores which canaries were inserted, as the bound requires.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .mechanism import PrivacyMechanism, Tensors, clip_flat
from .noise import ChaChaSource, secret_key, secure_source

CANARY_SCALE = 10.0  # a canary update is CANARY_SCALE * C before clipping: always clipped to C
CONFIDENCE = 0.95
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # r / k, Bonferroni-corrected
MIN_PER_SIDE = 10  # canaries on each side needed for the Gaussian estimate
REGRESSION_CELLS = 20_000_000  # k * d at most for the least-squares scores (160 MB of float64)


@dataclass(frozen=True)
class AuditReport:
    """One evaluation of the in-run audit."""

    canaries: int
    inserted: int
    epsilon_lower_bound: float
    confidence: float
    epsilon_estimate: float | None
    epsilon_estimate_low: float | None  # the estimate at the low end of the shift's 95 % range
    mean_score_inserted: float
    mean_score_held_out: float
    correct_guesses: int
    guesses: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _binomial_sf(threshold: int, trials: int, p: float) -> float:
    from scipy import stats

    return float(stats.binom.sf(threshold, trials, p))


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float,
                    delta: float) -> float:
    """Probability that an (ε, δ)-DP mechanism lets ``correct`` of ``guesses`` guesses about
    independently (1/2) included canaries be right (Steinke et al. 2023, Theorem 3)."""
    q = 1.0 / (1.0 + math.exp(-epsilon))  # randomised response's accuracy at ε
    beta = _binomial_sf(correct - 1, guesses, q)
    if delta == 0 or correct == 0:
        return min(beta, 1.0)
    alpha = max((_binomial_sf(correct - i - 1, guesses, q) - beta) / i
                for i in range(1, correct + 1))
    return min(beta + max(alpha, 0.0) * delta * 2 * canaries, 1.0)


def one_run_lower_bound(canaries: int, guesses: int, correct: int, delta: float,
                        significance: float) -> float:
    """The largest ε that the guesses refute at ``significance`` (0 when none is)."""
    if guesses == 0 or one_run_p_value(canaries, guesses, correct, 0.0, delta) > significance:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(canaries, guesses, correct, high, delta) <= significance:
        low, high = high, 2 * high
        if high > 1e3:
            return low
    for _ in range(60):
        middle = (low + high) / 2
        if one_run_p_value(canaries, guesses, correct, middle, delta) <= significance:
            low = middle
        else:
            high = middle
    return low


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """ε at δ of the Gaussian mechanism whose two worlds are N(0, 1) and N(mu, 1) (Dong, Roth
    and Su's mu-GDP): the root of Phi(-ε/mu + mu/2) - e^ε Phi(-ε/mu - mu/2) = δ."""
    from scipy import optimize, stats

    mu = abs(mu)
    if mu == 0:
        return 0.0

    def excess(epsilon: float) -> float:
        return float(stats.norm.cdf(-epsilon / mu + mu / 2)
                     - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2)) - delta

    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        high *= 2
        if high > 1e3:
            return math.inf
    return float(optimize.brentq(excess, 0.0, high, xtol=1e-9))


def audit_scores(scores: np.ndarray, inserted: np.ndarray, delta: float,
                 confidence: float = CONFIDENCE) -> AuditReport:
    """The one-run lower bound and the Gaussian estimate from canary scores."""
    count = len(scores)
    order = np.argsort(-scores, kind="stable")
    significance = (1 - confidence) / len(GUESS_FRACTIONS)
    best = (0.0, 0, 0)
    for fraction in GUESS_FRACTIONS:
        guesses = max(1, round(fraction * count))
        correct = int(inserted[order[:guesses]].sum())
        bound = one_run_lower_bound(count, guesses, correct, delta, significance)
        if bound > best[0] or best[1] == 0:
            best = (bound, correct, guesses)
    scores_in, scores_out = scores[inserted], scores[~inserted]
    estimate = estimate_low = None
    if min(len(scores_in), len(scores_out)) >= MIN_PER_SIDE:
        n_in, n_out = len(scores_in), len(scores_out)
        pooled = math.sqrt(((n_in - 1) * scores_in.var(ddof=1)
                            + (n_out - 1) * scores_out.var(ddof=1)) / (n_in + n_out - 2))
        if pooled > 0:
            shift = (float(scores_in.mean()) - float(scores_out.mean())) / pooled
            # standard error of a standardised mean difference (Hedges and Olkin)
            error = math.sqrt(1 / n_in + 1 / n_out + shift ** 2 / (2 * (n_in + n_out)))
            estimate = gaussian_dp_epsilon(shift, delta)
            estimate_low = gaussian_dp_epsilon(max(0.0, abs(shift) - 1.96 * error), delta)
    return AuditReport(
        canaries=count, inserted=int(inserted.sum()), epsilon_lower_bound=best[0],
        confidence=confidence, epsilon_estimate=estimate, epsilon_estimate_low=estimate_low,
        mean_score_inserted=float(scores_in.mean()) if len(scores_in) else math.nan,
        mean_score_held_out=float(scores_out.mean()) if len(scores_out) else math.nan,
        correct_guesses=best[1], guesses=best[2])


def audit_confidence(look: int) -> float:
    """The confidence of a run's ``look``-th audit (1-based, counted across resumes): an
    alpha-spending rule, alpha_k = (1 - CONFIDENCE) * 6 / (pi^2 k^2), whose sum over any number
    of looks is at most 1 - CONFIDENCE, so the chance of any false lower-bound flag in the run
    stays 5 % however often it audits and however often it is resumed or extended."""
    if look < 1:
        raise ValueError(f"audit look {look}: looks are counted from 1")
    return 1 - (1 - CONFIDENCE) * 6 / (math.pi ** 2 * look ** 2)


def audit_flags(report: AuditReport, epsilon: float | None) -> list[str]:
    """What the audit says against the accountant's ε: a lower bound above it is a bug or an
    attack; an estimate above it even at the low end of its own sampling range (with a few
    hundred canaries the estimate moves by about ±1) deserves a look."""
    if epsilon is None:
        return []
    flags = []
    if report.epsilon_lower_bound > epsilon:
        flags.append("lower-bound-above-epsilon")
    if report.epsilon_estimate_low is not None and report.epsilon_estimate_low > epsilon:
        flags.append("estimate-above-epsilon")
    return flags


class CanaryClients:
    """k canary clients holding population slots ``first_slot .. first_slot + k - 1``.

    Parameters
    ----------
    count : int
        k, the number of canaries (inserted and held out together).
    first_slot : int
        The first population slot they hold: the real clients' count N.
    template : Tensors
        Names and shapes of the released vector (the space the directions live in).
    clip_norm : float
        C; a canary's update has norm CANARY_SCALE * C before clipping.
    """

    def __init__(self, count: int, first_slot: int, template: Mapping[str, torch.Tensor],
                 clip_norm: float, key: bytes | None = None) -> None:
        self.count, self.first_slot, self.clip_norm = count, first_slot, clip_norm
        self.names = sorted(template)
        self.shapes = {k: tuple(template[k].shape) for k in self.names}
        self.dim = sum(math.prod(shape) for shape in self.shapes.values())
        self.key = key or secret_key("canaries")
        self.inserted = self._coins()
        self.total = np.zeros(self.dim)  # sum of the released round aggregates, flattened
        self.looks = 0  # audits the run has made (each spends part of its 5 % alpha)

    def _derive(self, *labels: object) -> bytes:
        return hashlib.sha256(repr((self.key, labels)).encode()).digest()

    def _coins(self) -> np.ndarray:
        """Which canaries are inserted: a fair secret coin each (independent, as the one-run
        bound requires)."""
        return ChaChaSource(self._derive("coins")).uniform_(
            torch.empty(self.count, dtype=torch.float64)).numpy() < 0.5

    def direction(self, index: int) -> np.ndarray:
        """Canary ``index``'s unit direction, regenerated from the key (never stored)."""
        vector = ChaChaSource(self._derive("direction", index)).normal_(
            torch.empty(self.dim, dtype=torch.float64)).numpy()
        return vector / np.linalg.norm(vector)

    def _tensors(self, flat: np.ndarray, like: Mapping[str, torch.Tensor]) -> Tensors:
        out, start = {}, 0
        for name in self.names:
            size = math.prod(self.shapes[name])
            out[name] = torch.from_numpy(flat[start:start + size].reshape(self.shapes[name])).to(
                like[name].device, like[name].dtype)
            start += size
        return out

    def _flat(self, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        return np.concatenate([tensors[name].detach().double().cpu().reshape(-1).numpy()
                               for name in self.names])

    def is_canary(self, slot: int) -> bool:
        return self.first_slot <= slot < self.first_slot + self.count

    def uploads(self, slots: Sequence[int], privacy: PrivacyMechanism, cohort: float,
                template: Mapping[str, torch.Tensor], server_round: int,
                support: Mapping[str, torch.Tensor] | None = None) -> list[Tensors]:
        """What the sampled canaries upload, released by the mechanism like any client's."""
        uploads = []
        for slot in slots:
            if not self.is_canary(slot):
                continue
            index = slot - self.first_slot
            update = (self.direction(index) * CANARY_SCALE * self.clip_norm
                      if self.inserted[index] else np.zeros(self.dim))
            released, _ = privacy.release(self._tensors(update, template), cohort,
                                          secure_source("canary-noise", server_round, slot),
                                          support=support)
            uploads.append(released)
        return uploads

    def contribution(self, slots: Sequence[int], template: Mapping[str, torch.Tensor],
                     support: Mapping[str, torch.Tensor] | None = None) -> Tensors:
        """The sum of the sampled canaries' clipped updates: what their uploads carry besides
        their noise shares. The server knows it (it inserted them), so taking it out of the
        released sum is post-processing, and the noise shares stay in."""
        total = {k: torch.zeros_like(t) for k, t in template.items()}
        for slot in slots:
            if not self.is_canary(slot) or not self.inserted[slot - self.first_slot]:
                continue
            update = self._tensors(self.direction(slot - self.first_slot) * CANARY_SCALE
                                   * self.clip_norm, template)
            if support is not None:
                update = {k: t * support[k] for k, t in update.items()}
            clipped, _ = clip_flat(update, self.clip_norm)
            for k in total:
                total[k] += clipped[k]
        return total

    def observe(self, mean_update: Mapping[str, torch.Tensor]) -> None:
        """Add a round's released aggregate to the running sum the audit scores."""
        self.total += self._flat(mean_update)

    def scores(self) -> np.ndarray:
        """Each canary's score against the sum of the released aggregates: its least-squares
        coefficient when the directions fit (see the module docstring), else the cosine."""
        if not np.linalg.norm(self.total):
            return np.zeros(self.count)
        if 2 * self.count <= self.dim and self.count * self.dim <= REGRESSION_CELLS:
            directions = np.stack([self.direction(j) for j in range(self.count)], axis=1)
            return np.linalg.lstsq(directions, self.total, rcond=None)[0]
        norm = np.linalg.norm(self.total)
        return np.array([float(self.direction(j) @ self.total) / norm
                         for j in range(self.count)])

    def report(self, delta: float, confidence: float | None = None) -> AuditReport:
        """The audit as of now: the run's next look, at its ``audit_confidence`` (or at
        ``confidence``, for a one-off check outside the run's sequence of looks)."""
        if confidence is None:
            self.looks += 1
            confidence = audit_confidence(self.looks)
        return audit_scores(self.scores(), self.inserted, delta, confidence)

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: the canaries' key (theirs, not any client's data), the sum and how
        many looks the run has taken (a resumed run goes on spending the same alpha)."""
        return {"count": self.count, "first_slot": self.first_slot, "dim": self.dim,
                "key": self.key, "total": self.total.copy(), "looks": self.looks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue an audit; refuses a state of other canaries or another released space."""
        mine = (self.count, self.first_slot, self.dim)
        theirs = (state["count"], state["first_slot"], state["dim"])
        if mine != theirs:
            raise ValueError(f"canary state for (count, first slot, dimension) {theirs} cannot "
                             f"continue an audit of {mine}")
        self.key = bytes(state["key"])
        self.inserted = self._coins()
        self.total = np.asarray(state["total"], dtype=np.float64).copy()
        self.looks = int(state.get("looks", 0))
