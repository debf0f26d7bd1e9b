"""The numpy reference and the one-round harness shared by the algorithm tests.

The model is softmax regression without bias (its cross-entropy gradient is (P - Y)^T X / n), in
float64 with full-batch steps, so every expected number is computed here, independently of the
code under test. ``one_round`` runs the real thing: the strategy's configure_train, each client's
round through ``client_round`` (the ClientApp's own path: model load, local rule, release and
privacy layer), and the strategy's aggregate_train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from torch import nn

from client_app.compute import client_round
from plateau.data import Tensors
from plateau.privacy.mechanism import mechanism_from_config
from strategies import STRATEGIES, PlateauStrategy
from tests.helpers import FakeGrid, make_config

RNG = np.random.default_rng(2024)
W0 = RNG.normal(size=(3, 4)) * 0.3
CLIENTS = [(RNG.normal(size=(5, 4)), RNG.integers(0, 3, size=5)) for _ in range(2)]
BASE = {"local_steps": 3, "batch_size": 64, "lr": 0.2, "weight_decay": 0.01, "grad_clip": 0.8,
        "sample_rate": 1.0}
K, LR, WD, GRAD_CLIP = BASE["local_steps"], BASE["lr"], BASE["weight_decay"], BASE["grad_clip"]


def ce_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    logits = x @ w.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (p - np.eye(w.shape[0])[y]).T @ x / len(y)


def clip(v: np.ndarray, bound: float) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v if bound <= 0 or norm <= bound else v * bound / norm


def sam_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray, rho: float) -> np.ndarray:
    g = ce_grad(w, x, y)
    return ce_grad(w + rho * g / np.linalg.norm(g), x, y) if rho > 0 else g


def sgd_steps(w: np.ndarray, x: np.ndarray, y: np.ndarray,
              direction: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """K steps of w <- w - lr * (direction(w) + wd * w)."""
    for _ in range(K):
        w = w - LR * (direction(w) + WD * w)
    return w


def smooth_reference(v: np.ndarray, lam: float) -> np.ndarray:
    """(I - lam*L)^-1 v with L the periodic 1-D Laplacian, by a dense linear solve."""
    d = v.size
    lap = -2 * np.eye(d) + np.roll(np.eye(d), 1, axis=1) + np.roll(np.eye(d), -1, axis=1)
    return np.linalg.solve(np.eye(d) - lam * lap, v.reshape(-1)).reshape(v.shape)


@dataclass
class Round:
    """What one round produced: the strategy after it, the messages, the clients' uploads (and
    their persistent states, to feed the next round) and the new global weight."""

    strategy: PlateauStrategy
    messages: list[Message]
    uploads: list[dict[str, np.ndarray]]
    states: list[dict[str, dict[str, torch.Tensor]]] = field(default_factory=list)
    new_weight: np.ndarray | None = None


def make_strategy(algorithm: str, **overrides: object) -> PlateauStrategy:
    config = make_config(algorithm=algorithm, **{**BASE, **overrides})
    return STRATEGIES[algorithm](config, parameter_names=["weight"], buffer_names=[],
                                 privacy=mechanism_from_config(config))


def one_round(algorithm: str, *, server_state: dict[str, np.ndarray] | None = None,
              client_states: list[dict[str, dict[str, torch.Tensor]]] | None = None,
              strategy: PlateauStrategy | None = None, weight: np.ndarray = W0,
              server_round: int = 1, **overrides: object) -> Round:
    """One real round of ``algorithm`` for the two reference clients."""
    strategy = strategy or make_strategy(algorithm, **overrides)
    pieces = strategy.state_pieces()
    for name, value in (server_state or {}).items():
        pieces[name].value = {"weight": torch.tensor(value)}
    arrays = ArrayRecord({"weight": torch.tensor(weight)})
    messages = sorted(strategy.configure_train(server_round, arrays, ConfigRecord(),
                                               FakeGrid([1, 2])),
                      key=lambda m: m.metadata.dst_node_id)
    states = [dict(s) for s in (client_states or [{}, {}])]
    replies, uploads = [], []
    for message, (x, y), state in zip(messages, CLIENTS, states, strict=True):
        content, _ = client_round(
            message.content, strategy.config, nn.Linear(4, 3, bias=False, dtype=torch.float64),
            Tensors(torch.tensor(x), torch.tensor(y)), state=state,
            generator=torch.Generator().manual_seed(0), num_partitions=2)
        uploads.append({k: v.numpy() for k, v in content["update"].items()})
        replies.append(Message(content=content, reply_to=message))
    new_arrays, _ = strategy.aggregate_train(server_round, replies)
    return Round(strategy, messages, uploads, states,
                 new_arrays["weight"].numpy() if new_arrays is not None else None)


def close(actual: object, expected: np.ndarray) -> None:
    if isinstance(actual, torch.Tensor):
        actual = actual.numpy()
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=1e-6)
