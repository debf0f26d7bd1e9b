"""FedWMSAM: three rounds against an independent numpy computation of the paper's rule.

The reference below is written from the rule as the authors state it (arXiv:2511.22080; README
of Huang-Yongzhi/NeurlPS_FedWMSAM), in its literal form: the personalised momentum
D = c_t + alpha/(1-alpha)*(c - c_i), the perturbation rho*d/|d| with d = (x_t + b*D) - y_b, the
step alpha*g + (1-alpha)*D, SCAFFOLD's c_i update and the cosine schedule of alpha. The module
under test uses a rescaled form (d*(1-alpha), alpha*(g - c_i + c) + (1-alpha)*c_t), so the
algebra between the two is checked too. Softmax regression in float64, full-batch steps, to
1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies import LOCAL_RULES
from tests.reference import CLIENTS, GRAD_CLIP, LR, RNG, W0, WD, K, ce_grad, clip, close
from tests.reference import one_round as run_round

C_T = RNG.normal(size=(3, 4)) * 0.3   # the global direction c_t (gradient-signed)
C = RNG.normal(size=(3, 4)) * 0.1     # SCAFFOLD's server control variate c
C_I = [RNG.normal(size=(3, 4)) * 0.1 for _ in CLIENTS]  # the clients' c_i
DECAY = 0.9  # lr-decay, so that every K*lr_t is the round's own


def wmsam_reference(rounds: int, alpha: float, rho: float, schedule: str = "cosine",
                    c_t: np.ndarray = C_T, c: np.ndarray = C,
                    c_is: list[np.ndarray] | None = None) -> list[dict]:
    """Each round: the clients' uploads and the server's new x, c_t, c and alpha."""
    x, c_is = W0, list(C_I if c_is is None else c_is)
    out = []
    for r in range(rounds):
        lr = LR * DECAY ** r
        deltas, changes, kept = [], [], []
        for (features, labels), c_i in zip(CLIENTS, c_is, strict=True):
            personal = c_t + alpha / (1 - alpha) * (c - c_i)
            y = x
            for b in range(K):
                d = (x + b * personal) - y
                n = np.linalg.norm(d)
                e = rho * d / n if n > 0 else np.zeros_like(d)
                g = clip(ce_grad(y + e, features, labels), GRAD_CLIP)
                y = y - lr * (alpha * g + (1 - alpha) * personal + WD * y)
            delta = y - x
            updated = c_i - c - delta / (K * lr)
            deltas.append(delta)
            changes.append(updated - c_i)
            kept.append(updated)
        mean = np.mean(deltas, axis=0)
        broadcast_alpha = alpha
        if schedule == "cosine":
            norms = np.linalg.norm(mean) * np.linalg.norm(c_t)
            value = 0.0 if norms == 0 else 1 + float((mean * c_t).sum()) / norms
            alpha = 0.99 * alpha + 0.01 * min(max(value, 0.1), 0.9)
        c = c + np.mean(changes, axis=0)
        c_t = -mean / (K * lr)
        x = x + mean
        c_is = kept
        out.append({"deltas": deltas, "changes": changes, "x": x, "c_t": c_t, "c": c,
                    "alpha": alpha, "broadcast_alpha": broadcast_alpha})
    return out


def run_rounds(rounds: int, *, states: bool = True, **overrides: object) -> list:
    """``rounds`` real rounds of fedwmsam, the server and client state carried over."""
    algorithm = str(overrides.pop("algorithm", "fedwmsam"))
    server = {"control": C} if states else None
    if server is not None and algorithm == "fedwmsam":
        server["direction"] = C_T
    clients = ([{"control": {"weight": torch.tensor(c_i)}} for c_i in C_I] if states else None)
    results, strategy, weight = [], None, W0
    for r in range(1, rounds + 1):
        result = run_round(algorithm, server_state=server if r == 1 else None,
                           client_states=clients, strategy=strategy, weight=weight,
                           server_round=r, lr_decay=DECAY, **overrides)
        # the strategy object carries on: keep this round's server state
        result.after = {name: {k: v.clone() for k, v in piece.items()}
                        for name, piece in result.strategy.state_pieces().items()}
        results.append(result)
        strategy, weight, clients = result.strategy, result.new_weight, result.states
    return results


@pytest.mark.parametrize("schedule", ["cosine", "fixed"])
def test_fedwmsam_rounds_match_the_reference(schedule: str) -> None:
    alpha, rho = 0.3, 0.2
    results = run_rounds(3, wmsam_alpha=alpha, wmsam_rho=rho, wmsam_schedule=schedule)
    expected = wmsam_reference(3, alpha, rho, schedule)
    for result, want in zip(results, expected, strict=True):
        message = result.messages[0].content
        assert message["config"]["local-rule"] == "wmsam"
        close(message["mixing"]["alpha"].numpy(), np.array([want["broadcast_alpha"]]))
        for upload, delta, change in zip(result.uploads, want["deltas"], want["changes"],
                                         strict=True):
            close(upload["weight"], delta)
            close(upload["cv:weight"], change)
        close(result.new_weight, want["x"])
        close(result.after["direction"]["weight"], want["c_t"])
        close(result.after["control"]["weight"], want["c"])
        close(result.after["mixing"]["alpha"], np.array([want["alpha"]]))
    if schedule == "fixed":
        assert results[-1].strategy.mixing.alpha == alpha


def test_fedwmsam_first_round_from_zero_state_matches_the_reference() -> None:
    """c_t = c = c_i = 0: no perturbation target but the clients' own drift, alpha*g steps, and
    the undefined cosine pulls alpha towards 0.1 (the authors' convention)."""
    zero = np.zeros_like(W0)
    results = run_rounds(2, states=False, wmsam_alpha=0.5, wmsam_rho=0.1)
    expected = wmsam_reference(2, 0.5, 0.1, c_t=zero, c=zero, c_is=[zero, zero])
    for result, want in zip(results, expected, strict=True):
        close(result.new_weight, want["x"])
        close(result.after["mixing"]["alpha"], np.array([want["alpha"]]))
    assert expected[0]["alpha"] == pytest.approx(0.99 * 0.5 + 0.01 * 0.1)


def test_fedwmsam_without_radius_at_alpha_one_is_scaffold() -> None:
    """rho = 0 and alpha = 1 (fixed): the steps are g - c_i + c, SCAFFOLD option II."""
    wmsam = run_rounds(3, wmsam_alpha=1.0, wmsam_rho=0.0, wmsam_schedule="fixed")
    scaffold = run_rounds(3, algorithm="scaffold")
    for mine, theirs in zip(wmsam, scaffold, strict=True):
        close(mine.new_weight, theirs.new_weight)
        for upload, other in zip(mine.uploads, theirs.uploads, strict=True):
            close(upload["cv:weight"], other["cv:weight"])


def test_fedwmsam_rule_is_registered_with_one_backprop() -> None:
    assert LOCAL_RULES["wmsam"].backprops_per_step == 1
