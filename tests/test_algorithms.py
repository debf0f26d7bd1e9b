"""DP-FedPGN, DP-FedPGN-LS and FedNSAM: one round against an independent numpy computation.

The model is softmax regression without bias (its cross-entropy gradient is (P - Y)^T X / n), in
float64 with full-batch steps, so every number below is computed by the reference functions in
this file, not by the code under test, and compared to 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plateau.data import Tensors as DataTensors
from plateau.local import LocalTask
from plateau.privacy.mechanism import flat_norm, mechanism_from_config
from plateau.privacy.noise import ChaChaSource
from strategies import LOCAL_RULES, STRATEGIES
from strategies.aggregation import Aggregate
from strategies.smoothing import laplacian_smooth
from tests.helpers import make_config
from tests.reference import (
    BASE,
    CLIENTS,
    RNG,
    W0,
    ce_grad,
    clip,
    close,
    sgd_steps,
    smooth_reference,
)
from tests.reference import one_round as run_round


def one_round(algorithm: str, state: np.ndarray | None = None, **overrides: object):
    """(strategy, messages, uploads) of a round with c_t (fedpgn) or m_t (fednsam) preset."""
    attribute = "direction" if algorithm.startswith("fedpgn") else "momentum"
    result = run_round(algorithm, server_state={attribute: state} if state is not None else None,
                       **overrides)
    result.strategy.new_weight = result.new_weight
    uploads = [{k: torch.from_numpy(v) for k, v in u.items()} for u in result.uploads]
    return result.strategy, result.messages, uploads


# ----- DP-FedPGN -------------------------------------------------------------------------------

C_T = RNG.normal(size=(3, 4)) * 0.5


def pgn_mix_reference(gamma: float, clip_norm: float | None, c: np.ndarray):
    lr, k = BASE["lr"], BASE["local_steps"]
    private = []
    for x, y in CLIENTS:
        w = sgd_steps(W0, x, y, lambda w, x=x, y=y: gamma * clip(ce_grad(w, x, y),
                                                                 BASE["grad_clip"])
                      + (1 - gamma) * c)
        r = (W0 - w) - (1 - gamma) * k * lr * c
        private.append(clip(r, clip_norm) if clip_norm else r)
    full = np.mean(private, axis=0) + (1 - gamma) * k * lr * c
    return private, full, W0 - full, full / (k * lr)


def test_fedpgn_mix_round_with_flat_clipping_matches_the_reference() -> None:
    strategy, messages, uploads = one_round("fedpgn", C_T, pgn_gamma=0.3, dp="central",
                                            noise_multiplier=0.0, clip_norm=0.15)
    private, _, new_w, new_c = pgn_mix_reference(0.3, 0.15, C_T)
    assert all(m.content["config"]["local-rule"] == "pgn-mix" for m in messages)
    close(messages[0].content["direction"]["weight"].numpy(), C_T)  # c_t is broadcast
    for upload, expected in zip(uploads, private, strict=True):
        close(upload["weight"], expected)
        assert flat_norm(upload) <= 0.15 * (1 + 1e-9)  # the private part is clipped to C
    close(strategy.new_weight, new_w)
    close(strategy.direction["weight"], new_c)  # c_{t+1} computed on the server


def test_fedpgn_round_without_dp_matches_the_reference() -> None:
    strategy, _, uploads = one_round("fedpgn", C_T, pgn_gamma=0.2)
    private, _, new_w, new_c = pgn_mix_reference(0.2, None, C_T)
    for upload, expected in zip(uploads, private, strict=True):
        close(upload["weight"], expected)
    close(strategy.new_weight, new_w)
    close(strategy.direction["weight"], new_c)


def test_fedpgn_perturb_form_matches_the_reference() -> None:
    alpha, radius = 0.4, 0.3
    strategy, messages, uploads = one_round("fedpgn", C_T, pgn_form="perturb", pgn_alpha=alpha,
                                            pgn_radius=radius)
    assert messages[0].content["config"]["local-rule"] == "pgn-perturb"
    shift = radius * C_T / np.linalg.norm(C_T)
    private = []
    for x, y in CLIENTS:
        w = sgd_steps(W0, x, y, lambda w, x=x, y=y: clip(
            (1 - alpha) * ce_grad(w, x, y) + alpha * ce_grad(w + shift, x, y),
            BASE["grad_clip"]))
        private.append(W0 - w)
    for upload, expected in zip(uploads, private, strict=True):
        close(upload["weight"], expected)
    full = np.mean(private, axis=0)
    close(strategy.new_weight, W0 - full)
    close(strategy.direction["weight"], full / (BASE["local_steps"] * BASE["lr"]))


def test_fedpgn_server_adds_back_exactly_the_public_part() -> None:
    config = make_config(algorithm="fedpgn", pgn_gamma=0.25, **BASE)
    strategy = STRATEGIES["fedpgn"](config, parameter_names=["weight"], buffer_names=[])
    strategy.current = {"weight": torch.tensor(W0)}
    strategy.direction.value = {"weight": torch.tensor(C_T)}
    new = strategy.apply_update(1, Aggregate({"weight": torch.zeros(3, 4, dtype=torch.float64)},
                                             2.0, 2))
    public = (1 - 0.25) * BASE["local_steps"] * BASE["lr"] * C_T
    close(new["weight"], W0 - public)


def test_fedpgn_with_gamma_one_is_fedavg() -> None:
    pgn, _, _ = one_round("fedpgn", C_T, pgn_gamma=1.0)
    avg, _, _ = one_round("fedavg")
    close(pgn.new_weight, avg.new_weight)


def test_fedpgn_first_round_uses_a_zero_direction() -> None:
    strategy, messages, _ = one_round("fedpgn", None, pgn_gamma=0.2)
    assert not messages[0].content["direction"]["weight"].numpy().any()
    _, _, new_w, _ = pgn_mix_reference(0.2, None, np.zeros_like(W0))
    close(strategy.new_weight, new_w)


# ----- DP-FedPGN-LS ----------------------------------------------------------------------------

def test_fedpgn_ls_smooths_the_step_but_not_the_direction() -> None:
    strategy, _, _ = one_round("fedpgn-ls", C_T, pgn_gamma=0.3, ls_sigma=0.7)
    _, full, _, new_c = pgn_mix_reference(0.3, None, C_T)
    close(strategy.new_weight, W0 - smooth_reference(full, 0.7))
    close(strategy.direction["weight"], new_c)


def test_fedpgn_ls_with_sigma_zero_is_fedpgn() -> None:
    ls, _, _ = one_round("fedpgn-ls", C_T, ls_sigma=0.0)
    pgn, _, _ = one_round("fedpgn", C_T)
    close(ls.new_weight, pgn.new_weight)


def test_smoother_matches_the_dense_inverse_and_keeps_constants() -> None:
    v = RNG.normal(size=(7, 5))
    close(laplacian_smooth(torch.tensor(v), 1.3), smooth_reference(v, 1.3))
    constant = torch.full((4, 6), 2.5, dtype=torch.float64)
    close(laplacian_smooth(constant, 3.0), constant.numpy())


@pytest.mark.parametrize("size", [1, 2, 3])
def test_smoother_is_the_same_operator_for_tiny_tensors(size: int) -> None:
    """A 2-element tensor (a binary head's bias) is smoothed too: (I - lambda*L)^-1 is not the
    identity for d = 2 (it damps the difference of the two entries by 1 / (1 + 4*lambda))."""
    v = RNG.normal(size=size)
    close(laplacian_smooth(torch.tensor(v), 0.8), smooth_reference(v, 0.8))
    if size == 2:
        smoothed = laplacian_smooth(torch.tensor(v), 0.8).numpy()
        assert smoothed[0] - smoothed[1] == pytest.approx((v[0] - v[1]) / (1 + 4 * 0.8))


def test_smoother_never_amplifies_and_damps_the_laplacian_energy_of_noise() -> None:
    noise = torch.randn(10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    smoothed = laplacian_smooth(noise, 1.0)

    def energy(v: torch.Tensor) -> float:  # sum of squared neighbour differences (periodic)
        return float(((v - torch.roll(v, 1)) ** 2).sum())

    assert energy(smoothed) < 0.2 * energy(noise)
    assert float(smoothed.norm()) <= float(noise.norm())
    assert smoothed.dtype == noise.dtype and smoothed.shape == noise.shape


# ----- FedNSAM ---------------------------------------------------------------------------------

M_T = RNG.normal(size=(3, 4)) * 0.2


def test_fednsam_round_matches_the_reference() -> None:
    gamma, rho = 0.6, 0.1
    strategy, messages, uploads = one_round("fednsam", M_T, nsam_gamma=gamma, nsam_rho=rho)
    assert messages[0].content["config"]["local-rule"] == "nsam"
    close(messages[0].content["momentum"]["weight"].numpy(), M_T)
    shift = gamma * M_T - rho * M_T / np.linalg.norm(M_T)
    deltas = []
    for x, y in CLIENTS:
        w = sgd_steps(W0, x, y, lambda w, x=x, y=y: clip(ce_grad(w + shift, x, y),
                                                         BASE["grad_clip"]))
        deltas.append(w - W0)
    for upload, expected in zip(uploads, deltas, strict=True):
        close(upload["weight"], expected)
    momentum = gamma * M_T + np.mean(deltas, axis=0)
    close(strategy.momentum["weight"], momentum)  # m_{t+1} = gamma m_t + mean(Delta)
    close(strategy.new_weight, W0 + momentum)


def test_fednsam_code_form_matches_the_reference() -> None:
    gamma, rho = 0.5, 0.2
    strategy, messages, uploads = one_round("fednsam", M_T, nsam_gamma=gamma, nsam_rho=rho,
                                            nsam_form="code")
    assert messages[0].content["config"]["local-rule"] == "nsam-code"
    start = W0 + gamma * M_T
    deltas = []
    for x, y in CLIENTS:
        def sam_direction(w: np.ndarray, x: np.ndarray = x, y: np.ndarray = y) -> np.ndarray:
            g = ce_grad(w, x, y)
            return clip(ce_grad(w + rho * g / np.linalg.norm(g), x, y), BASE["grad_clip"])

        deltas.append(sgd_steps(start, x, y, sam_direction) - start)
    for upload, expected in zip(uploads, deltas, strict=True):
        close(upload["weight"], expected)
    momentum = gamma * M_T + np.mean(deltas, axis=0)
    close(strategy.new_weight, W0 + momentum)


def test_fednsam_first_round_is_a_fedavg_round() -> None:
    nsam, _, _ = one_round("fednsam")
    avg, _, _ = one_round("fedavg")
    close(nsam.new_weight, avg.new_weight)


def test_fednsam_without_momentum_or_radius_is_fedavg_in_every_round() -> None:
    nsam, _, _ = one_round("fednsam", M_T, nsam_gamma=0.0, nsam_rho=0.0)
    avg, _, _ = one_round("fedavg")
    close(nsam.new_weight, avg.new_weight)


@pytest.mark.parametrize("name", sorted(LOCAL_RULES))
def test_local_rules_declare_their_cost(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every registered rule does exactly its declared backprops per step (counted, with every
    broadcast vector non-zero so each SAM shift is taken)."""
    calls: list[int] = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    x, y = CLIENTS[0]
    broadcast = {n: {"weight": torch.tensor(C_T)}
                 for n in ("direction", "momentum", "control", "perturbation")}
    task = LocalTask(model=torch.nn.Linear(4, 3, bias=False, dtype=torch.float64),
                     data=DataTensors(torch.tensor(x), torch.tensor(y)),
                     config=make_config(**BASE), lr=BASE["lr"],
                     generator=torch.Generator().manual_seed(0), broadcast=broadcast)
    LOCAL_RULES[name].run(task)
    assert len(calls) == BASE["local_steps"] * LOCAL_RULES[name].backprops_per_step


def test_the_papers_and_baselines_rules_are_registered() -> None:
    assert {"sgd", "sam", "prox", "cm", "mosam", "lesam", "scaffold", "gamma", "dyn", "smoo",
            "blur", "pgn-mix", "pgn-perturb", "nsam", "nsam-code"} <= set(LOCAL_RULES)


# ----- the authors' privatiser (code mode) -----------------------------------------------------

def test_code_clip_mode_clips_each_tensor_at_the_median_norm() -> None:
    mechanism = mechanism_from_config(make_config(dp="distributed", dp_clip_mode="code",
                                                  noise_multiplier=0.0))
    assert mechanism is not None and not mechanism.formally_dp
    update = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0]),
              "c": torch.tensor([4.0, 0.0])}
    released, report = mechanism.release(update, 4, ChaChaSource.from_os())
    close(released["a"], np.array([1.0, 0.0]))
    close(released["b"], np.array([0.0, 2.0]))
    close(released["c"], np.array([2.0, 0.0]))  # median of (1, 2, 4) is 2
    assert report.clipped and report.error == pytest.approx(2.0)
    assert mechanism.effective_noise_multiplier(4, 4) is None
