"""FedSpeed: one round against an independent numpy computation (to 1e-6), under DP too, and the
prox-correction state carried into the next round."""

from __future__ import annotations

import numpy as np
import torch

from plateau.privacy.mechanism import flat_norm
from tests.reference import CLIENTS, GRAD_CLIP, LR, RNG, W0, WD, K, ce_grad, clip, close, one_round

H_I = [RNG.normal(size=(3, 4)) * 0.2 for _ in CLIENTS]  # each client's accumulated updates
SERVER_H = RNG.normal(size=(3, 4)) * 0.1


def reference_delta(x: np.ndarray, y: np.ndarray, h_i: np.ndarray, alpha: float, rho: float,
                    lam: float, start: np.ndarray = W0) -> np.ndarray:
    """K steps along clip((1-a) g(w) + a g(w + rho g/|g|) + (h_i - x_t)/lam) + (1/lam + wd) w,
    FL-Simulator's step (client/fedspeed.py: clip_grad_norm_, then SGD with weight_decay)."""
    w = start.copy()
    for _ in range(K):
        g = ce_grad(w, x, y)
        sharp = ce_grad(w + rho * g / np.linalg.norm(g), x, y) if rho > 0 else g
        merged = (1 - alpha) * g + alpha * sharp
        w = w - LR * (clip(merged + (h_i - start) / lam, GRAD_CLIP) + (1 / lam + WD) * w)
    return w - start


def states(values: list[np.ndarray]) -> list[dict[str, dict[str, torch.Tensor]]]:
    return [{"accumulated": {"weight": torch.tensor(v)}} for v in values]


def test_fedspeed_round_matches_the_reference() -> None:
    alpha, rho, lam = 0.6, 0.2, 4.0
    result = one_round("fedspeed", server_state={"accumulated": SERVER_H},
                       client_states=states(H_I), fedspeed_alpha=alpha, fedspeed_rho=rho,
                       fedspeed_lambda=lam, population_size=4)
    assert result.messages[0].content["config"]["local-rule"] == "speed"
    deltas = [reference_delta(x, y, h, alpha, rho, lam)
              for (x, y), h in zip(CLIENTS, H_I, strict=True)]
    for upload, delta in zip(result.uploads, deltas, strict=True):
        assert set(upload) == {"weight"}  # only Delta_i leaves the client, never H_i
        close(upload["weight"], delta)
    for kept, h_i, delta in zip(result.states, H_I, deltas, strict=True):
        close(kept["accumulated"]["weight"], h_i + delta)
    accumulated = SERVER_H + np.sum(deltas, axis=0) / 4  # H <- H + (1/N) sum over the cohort
    close(result.strategy.accumulated["weight"], accumulated)
    close(result.new_weight, W0 + np.mean(deltas, axis=0) + accumulated)


def test_fedspeed_under_central_dp_clips_the_released_update() -> None:
    bound = 0.05
    result = one_round("fedspeed", client_states=states(H_I), dp="central",
                       noise_multiplier=0.0, clip_norm=bound)
    deltas = [clip(reference_delta(x, y, h, 1.0, 0.05, 10.0), bound)
              for (x, y), h in zip(CLIENTS, H_I, strict=True)]
    for upload, delta in zip(result.uploads, deltas, strict=True):
        close(upload["weight"], delta)
        assert flat_norm({"w": torch.tensor(upload["weight"])}) <= bound * (1 + 1e-9)
    # the node keeps its unclipped accumulated update; the server only sees the clipped one
    raw = [reference_delta(x, y, h, 1.0, 0.05, 10.0) for (x, y), h in zip(CLIENTS, H_I,
                                                                           strict=True)]
    for kept, h_i, delta in zip(result.states, H_I, raw, strict=True):
        close(kept["accumulated"]["weight"], h_i + delta)


def test_fedspeed_state_carries_into_the_next_round() -> None:
    first = one_round("fedspeed")
    kept = [s["accumulated"]["weight"].numpy() for s in first.states]
    close(kept[0], first.uploads[0]["weight"])  # H_i starts at zero: H_i = Delta_i
    second = one_round("fedspeed", strategy=first.strategy, client_states=first.states,
                       weight=first.new_weight, server_round=2)
    deltas = [reference_delta(x, y, h, 1.0, 0.05, 10.0, start=first.new_weight)
              for (x, y), h in zip(CLIENTS, kept, strict=True)]
    for upload, delta in zip(second.uploads, deltas, strict=True):
        close(upload["weight"], delta)
