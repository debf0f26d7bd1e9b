"""Flatness probes against closed forms on a quadratic loss, and the probe on a real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server_app.flatness import FlatnessProbe, sam_sharpness, top_hessian_eigenvalue
from tests.helpers import make_config

RNG = np.random.default_rng(5)
X = RNG.normal(size=(40, 6)) * np.linspace(0.5, 3.0, 6)
Y = RNG.normal(size=(40, 1))
W = RNG.normal(size=(1, 6))


def linear_model() -> nn.Linear:
    model = nn.Linear(6, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(W))
    return model


def test_top_hessian_eigenvalue_of_least_squares() -> None:
    # L(w) = mean((Xw - y)^2) has Hessian 2 X^T X / n
    expected = np.linalg.eigvalsh(2 * X.T @ X / len(X)).max()
    found = top_hessian_eigenvalue(linear_model(), torch.tensor(X), torch.tensor(Y), iters=200,
                                   generator=torch.Generator().manual_seed(0), loss_fn=F.mse_loss)
    assert found == pytest.approx(expected, rel=1e-6)


def test_sam_sharpness_of_least_squares() -> None:
    # for a quadratic, L(w + rho g/|g|) - L(w) = rho |g| + rho^2/2 * g^T H g / |g|^2
    rho = 0.05
    residual = X @ W.T - Y
    grad = (2 * residual.T @ X / len(X)).reshape(-1)
    hessian = 2 * X.T @ X / len(X)
    expected = rho * np.linalg.norm(grad) + rho**2 / 2 * grad @ hessian @ grad / (grad @ grad)
    found = sam_sharpness(linear_model(), torch.tensor(X), torch.tensor(Y), rho,
                          loss_fn=F.mse_loss)
    assert found == pytest.approx(expected, rel=1e-9)


def test_probes_leave_the_model_unchanged() -> None:
    model = linear_model()
    sam_sharpness(model, torch.tensor(X), torch.tensor(Y), 0.5, loss_fn=F.mse_loss)
    top_hessian_eigenvalue(model, torch.tensor(X), torch.tensor(Y), 5, torch.Generator(),
                           loss_fn=F.mse_loss)
    np.testing.assert_array_equal(model.weight.detach().numpy(), W)


def test_probe_measures_the_cnn_on_a_fixed_held_out_batch() -> None:
    config = make_config(sharpness_every=2, sharpness_batch_size=64, sharpness_iters=5)
    probe = FlatnessProbe(config, torch.device("cpu"))
    assert probe.x.shape[0] == 64
    assert [probe.due(t) for t in (1, 2, 3, 4)] == [False, True, False, True]
    state = {k: v.clone() for k, v in probe.model.state_dict().items()}
    first = probe(state, 2)
    again = probe(state, 2)
    assert first == again and first.sharpness > 0 and first.hessian_top_eigenvalue != 0
