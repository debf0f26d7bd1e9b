"""Named seed streams: every random choice the run's ``seed`` fixes draws from its own stream.

A stream is the run seed, the stream's name and its indices (round, partition, ...), hashed
together by numpy's ``SeedSequence``: two streams never share a seed whatever their indices
(with bare integer salts, client 4242's batches in a round could be the flatness probe's). None of
these streams is ever used for DP noise or DP sampling, which draw from fresh OS entropy
(``plateau.privacy.noise``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

STREAMS = (
    "cohort",  # which clients a non-private round samples (server_round)
    "client-batches",  # a client's mini-batches (server_round, partition)
    "public-mask",  # DP-FedSMP's public coordinate mask (server_round)
    "validation-split",  # which training examples are held out for validation
    "test-subset",  # the held-out examples central evaluation uses
    "flatness-batch",  # the flatness probes' fixed batch
    "flatness-probe",  # the power iteration's start (server_round)
)


def stream_seed(seed: int, stream: str, *indices: int) -> int:
    """A 63-bit seed of a named stream at some indices."""
    if stream not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; known: {', '.join(STREAMS)}")
    tag = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:8], "big")
    state = np.random.SeedSequence([seed, tag, len(indices), *indices]).generate_state(2,
                                                                                       np.uint64)
    return int(state[0] >> np.uint64(1))


def stream_generator(seed: int, stream: str, *indices: int) -> torch.Generator:
    """A CPU torch generator of a named stream."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, *indices))


def stream_rng(seed: int, stream: str, *indices: int) -> np.random.Generator:
    """A numpy generator of a named stream."""
    return np.random.default_rng(stream_seed(seed, stream, *indices))
