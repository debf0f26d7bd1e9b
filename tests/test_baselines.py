"""Every baseline: one round against an independent numpy computation (to 1e-6), its reduction
to FedAvg, regularisers that really pass a gradient, and client state that persists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plateau.privacy.mechanism import flat_norm
from tests.reference import (
    CLIENTS,
    GRAD_CLIP,
    LR,
    RNG,
    W0,
    WD,
    K,
    ce_grad,
    clip,
    close,
    one_round,
    sam_grad,
    sgd_steps,
    smooth_reference,
)

C_T = RNG.normal(size=(3, 4)) * 0.4  # a global direction / momentum / control variate
C_I = [RNG.normal(size=(3, 4)) * 0.3 for _ in CLIENTS]  # per-client states
H_I = [RNG.normal(size=(3, 4)) * 0.2 for _ in CLIENTS]


def state(name: str, values: list[np.ndarray]) -> list[dict[str, dict[str, torch.Tensor]]]:
    return [{name: {"weight": torch.tensor(v)}} for v in values]


def plain(x: np.ndarray, y: np.ndarray):
    return lambda w: clip(ce_grad(w, x, y), GRAD_CLIP)


def client_deltas(direction_for, start: np.ndarray = W0) -> list[np.ndarray]:
    """Delta_i = y_K - start for each reference client, stepping along direction_for(x, y)."""
    return [sgd_steps(start, x, y, direction_for(x, y)) - start for x, y in CLIENTS]


def fedavg_weight() -> np.ndarray:
    return W0 + np.mean(client_deltas(plain), axis=0)


# ----- one round against the reference ---------------------------------------------------------

def test_fedavgm() -> None:
    result = one_round("fedavgm", server_state={"momentum": C_T}, server_momentum=0.7,
                       server_lr=0.5)
    momentum = 0.7 * C_T + np.mean(client_deltas(plain), axis=0)
    close(result.strategy.momentum["weight"], momentum)
    close(result.new_weight, W0 + 0.5 * momentum)


def test_fedacg_broadcasts_the_look_ahead_and_pulls_towards_it() -> None:
    lam, beta = 0.6, 0.3
    result = one_round("fedacg", server_state={"momentum": C_T}, acg_lambda=lam, acg_beta=beta)
    ahead = W0 + lam * C_T
    close(result.messages[0].content["arrays"]["weight"].numpy(), ahead)
    deltas = client_deltas(lambda x, y: lambda w: clip(ce_grad(w, x, y), GRAD_CLIP)
                           + beta * (w - ahead), start=ahead)
    for upload, delta in zip(result.uploads, deltas, strict=True):
        close(upload["weight"], delta)
    momentum = lam * C_T + np.mean(deltas, axis=0)
    close(result.new_weight, W0 + momentum)


def test_fedcm() -> None:
    alpha = 0.3
    result = one_round("fedcm", server_state={"direction": C_T}, cm_alpha=alpha)
    deltas = client_deltas(lambda x, y: lambda w: alpha * clip(ce_grad(w, x, y), GRAD_CLIP)
                           + (1 - alpha) * C_T)
    mean = np.mean(deltas, axis=0)
    close(result.new_weight, W0 + mean)
    close(result.strategy.direction["weight"], -mean / (K * LR))


def test_mofedsam() -> None:
    alpha, rho = 0.4, 0.2
    result = one_round("mofedsam", server_state={"direction": C_T}, cm_alpha=alpha,
                       sam_rho=rho)
    deltas = client_deltas(lambda x, y: lambda w: alpha * clip(sam_grad(w, x, y, rho),
                                                               GRAD_CLIP)
                           + (1 - alpha) * C_T)
    close(result.new_weight, W0 + np.mean(deltas, axis=0))


def test_fedsam() -> None:
    result = one_round("fedsam", sam_rho=0.3)
    deltas = client_deltas(lambda x, y: lambda w: clip(sam_grad(w, x, y, 0.3), GRAD_CLIP))
    for upload, delta in zip(result.uploads, deltas, strict=True):
        close(upload["weight"], delta)
    close(result.new_weight, W0 + np.mean(deltas, axis=0))


def test_fedlesam_perturbs_along_the_last_global_update() -> None:
    rho = 0.25
    result = one_round("fedlesam", server_state={"direction": C_T}, sam_rho=rho)
    shift = rho * C_T / np.linalg.norm(C_T)
    deltas = client_deltas(lambda x, y: lambda w: clip(ce_grad(w + shift, x, y), GRAD_CLIP))
    mean = np.mean(deltas, axis=0)
    close(result.new_weight, W0 + mean)
    close(result.strategy.direction["weight"], -mean / (K * LR))


@pytest.mark.parametrize(("algorithm", "rho"), [("scaffold", 0.0), ("fedgamma", 0.2)])
def test_control_variates(algorithm: str, rho: float) -> None:
    result = one_round(algorithm, server_state={"control": C_T},
                       client_states=state("control", C_I), sam_rho=rho, population_size=4)
    deltas, changes = [], []
    for (x, y), c_i in zip(CLIENTS, C_I, strict=True):
        delta = sgd_steps(W0, x, y, lambda w, x=x, y=y, c_i=c_i:
                          clip(sam_grad(w, x, y, rho), GRAD_CLIP) - c_i + C_T) - W0
        updated = c_i - C_T - delta / (K * LR)
        deltas.append(delta)
        changes.append(updated - c_i)
    for upload, delta, change in zip(result.uploads, deltas, changes, strict=True):
        close(upload["weight"], delta)
        close(upload["cv:weight"], change)
    for kept, c_i, change in zip(result.states, C_I, changes, strict=True):
        close(kept["control"]["weight"], c_i + change)  # c_i+ stays on the client
    close(result.new_weight, W0 + np.mean(deltas, axis=0))
    # population N = 4 (two connected, both sampled): c <- c + (1/N) * sum(Delta_c)
    close(result.strategy.control["weight"], C_T + np.sum(changes, axis=0) / 4)


def test_feddyn() -> None:
    alpha = 0.5
    server_h = RNG.normal(size=(3, 4)) * 0.1
    result = one_round("feddyn", server_state={"accumulated": server_h},
                       client_states=state("accumulated", H_I), dyn_alpha=alpha,
                       population_size=4)
    deltas = []
    for (x, y), h_i in zip(CLIENTS, H_I, strict=True):
        deltas.append(sgd_steps(W0, x, y, lambda w, x=x, y=y, h_i=h_i:
                                clip(ce_grad(w, x, y), GRAD_CLIP)
                                + alpha * (w - W0 + h_i)) - W0)
    for kept, h_i, delta in zip(result.states, H_I, deltas, strict=True):
        close(kept["accumulated"]["weight"], h_i + delta)
    accumulated = server_h + np.sum(deltas, axis=0) / 4  # (1/N) sum over the sampled clients
    close(result.new_weight, W0 + np.mean(deltas, axis=0) + accumulated)


def test_fedsmoo() -> None:
    rho, lam = 0.2, 0.3
    s_t = RNG.normal(size=(3, 4)) * 0.05
    mu_i = [RNG.normal(size=(3, 4)) * 0.05 for _ in CLIENTS]
    result = one_round("fedsmoo", server_state={"perturbation": s_t},
                       client_states=[{"dual": {"weight": torch.tensor(m)},
                                       "accumulated": {"weight": torch.tensor(h)}}
                                      for m, h in zip(mu_i, H_I, strict=True)],
                       sam_rho=rho, dyn_alpha=lam)
    deltas, duals = [], []
    for (x, y), mu, h_i in zip(CLIENTS, mu_i, H_I, strict=True):
        w = W0.copy()
        for _ in range(K):
            g = ce_grad(w, x, y)
            corrected = g - mu - s_t
            shift = rho * corrected / (np.linalg.norm(corrected) + 1e-7)
            mu = mu + shift - s_t
            # FL-Simulator's step: the clip covers g(w + s) + lam (h_i - x_t); its SGD adds
            # (wd + lam) w after the clip
            w = w - LR * (clip(ce_grad(w + shift, x, y) + lam * (h_i - W0), GRAD_CLIP)
                          + (WD + lam) * w)
        deltas.append(w - W0)
        duals.append(mu)
    for upload, delta, mu in zip(result.uploads, deltas, duals, strict=True):
        close(upload["weight"], delta)
        close(upload["mu:weight"], mu)
    mean_mu = np.mean(duals, axis=0)
    close(result.strategy.perturbation["weight"], rho * mean_mu / (np.linalg.norm(mean_mu)
                                                                    + 1e-7))
    close(result.new_weight, W0 + np.mean(deltas, axis=0) + np.sum(deltas, axis=0) / 2)


def test_fedavg_ls() -> None:
    result = one_round("fedavg-ls", ls_sigma=0.8)
    close(result.new_weight, W0 + smooth_reference(np.mean(client_deltas(plain), axis=0), 0.8))


def test_fedsmp_sparsifies_then_clips_then_noises_only_the_kept_coordinates() -> None:
    keep, bound = 0.5, 0.05
    result = one_round("fedsmp", smp_keep=keep, dp="central", noise_multiplier=0.0,
                       clip_norm=bound)
    seed = int(result.messages[0].content["config"]["mask-seed"])
    mask = (torch.rand(3, 4, generator=torch.Generator().manual_seed(seed)) < keep).double()
    mask = mask.numpy()
    released = [clip(d * mask, bound) for d in client_deltas(plain)]
    for upload, expected in zip(result.uploads, released, strict=True):
        close(upload["weight"], expected)
    close(result.new_weight, W0 + np.mean(released, axis=0))
    noisy = one_round("fedsmp", smp_keep=keep, dp="distributed", noise_multiplier=5.0,
                      clip_norm=bound)
    for upload in noisy.uploads:
        assert np.all(upload["weight"][mask == 0] == 0)  # no noise off the mask
        assert np.abs(upload["weight"][mask == 1]).sum() > 0


def test_fedavg_blur_pulls_back_only_outside_the_clipping_ball() -> None:
    alpha, bound = 2.0, 0.1
    result = one_round("fedavg-blur", blur_alpha=alpha, clip_norm=bound)

    def direction_for(x: np.ndarray, y: np.ndarray):
        def direction(w: np.ndarray) -> np.ndarray:
            drift = w - W0
            pull = alpha * drift if np.linalg.norm(drift) > bound else 0
            return clip(ce_grad(w, x, y), GRAD_CLIP) + pull
        return direction

    deltas = client_deltas(direction_for)
    close(result.new_weight, W0 + np.mean(deltas, axis=0))
    assert not np.allclose(result.new_weight, fedavg_weight(), atol=1e-6)


# ----- reductions to FedAvg --------------------------------------------------------------------

@pytest.mark.parametrize(("algorithm", "overrides", "server_state"), [
    ("fedavgm", {"server_momentum": 0.0}, None),
    ("fedsam", {"sam_rho": 0.0}, None),
    ("fedacg", {"acg_lambda": 0.0, "acg_beta": 0.0}, None),
    ("fedcm", {"cm_alpha": 1.0}, {"direction": C_T}),
    ("mofedsam", {"cm_alpha": 1.0, "sam_rho": 0.0}, {"direction": C_T}),
    ("fedlesam", {}, None),  # first round: no global update yet
    ("scaffold", {}, None),  # first round: c = c_i = 0
    ("fedgamma", {"sam_rho": 0.0}, None),
    ("fedavg-ls", {"ls_sigma": 0.0}, None),
    ("fedsmp", {"smp_keep": 1.0}, None),
    ("fedavg-blur", {"blur_alpha": 0.0}, None),
])
def test_reduces_to_fedavg(algorithm: str, overrides: dict, server_state: dict | None) -> None:
    close(one_round(algorithm, server_state=server_state, **overrides).new_weight,
          fedavg_weight())


def test_fedgamma_without_sam_is_scaffold() -> None:
    gamma = one_round("fedgamma", server_state={"control": C_T},
                      client_states=state("control", C_I), sam_rho=0.0)
    scaffold = one_round("scaffold", server_state={"control": C_T},
                         client_states=state("control", C_I))
    close(gamma.new_weight, scaffold.new_weight)


# ----- regularisers pass a gradient (the .item() bug would make these equal) -------------------

@pytest.mark.parametrize(("algorithm", "on", "off", "client_states"), [
    ("fedacg", {"acg_beta": 1.0, "acg_lambda": 0.0}, {"acg_beta": 0.0, "acg_lambda": 0.0},
     None),
    ("feddyn", {"dyn_alpha": 0.5}, {"dyn_alpha": 0.0}, state("accumulated", H_I)),
    ("scaffold", {}, {}, state("control", C_I)),
    ("fedavg-blur", {"blur_alpha": 2.0, "clip_norm": 0.05},
     {"blur_alpha": 0.0, "clip_norm": 0.05}, None),
])
def test_regularisers_change_the_local_update(algorithm: str, on: dict, off: dict,
                                              client_states: list | None) -> None:
    with_term = one_round(algorithm, client_states=client_states, **on).uploads[0]["weight"]
    reference = "fedavg" if algorithm == "scaffold" else algorithm
    without = one_round(reference, client_states=client_states, **off).uploads[0]["weight"]
    assert np.abs(with_term - without).max() > 1e-4


# ----- privacy composition and state -----------------------------------------------------------

@pytest.mark.parametrize(("algorithm", "prefix"), [("scaffold", "cv:"), ("fedsmoo", "mu:")])
def test_extra_uploads_are_clipped_together_with_the_update(algorithm: str, prefix: str) -> None:
    result = one_round(algorithm, server_state=None, dp="central", noise_multiplier=0.0,
                       clip_norm=0.01)
    for upload in result.uploads:
        assert any(k.startswith(prefix) for k in upload)
        assert flat_norm({k: torch.tensor(v) for k, v in upload.items()}) <= 0.01 * (1 + 1e-9)


def test_client_state_carries_over_to_the_next_round() -> None:
    first = one_round("scaffold")
    second = one_round("scaffold", strategy=first.strategy, client_states=first.states,
                       weight=first.new_weight, server_round=2)
    assert all(s["rounds"]["n"].item() == 2 for s in second.states)
    fresh = one_round("scaffold", strategy=first.strategy, weight=first.new_weight,
                      server_round=2, client_states=None)
    assert not np.allclose(second.uploads[0]["cv:weight"], fresh.uploads[0]["cv:weight"])
