"""Named seed streams: deterministic, and apart from each other whatever their indices."""

from __future__ import annotations

import itertools

import pytest
import torch

from plateau.seeds import STREAMS, stream_generator, stream_rng, stream_seed


def test_a_stream_is_a_function_of_seed_name_and_indices() -> None:
    assert stream_seed(5, "client-batches", 3, 7) == stream_seed(5, "client-batches", 3, 7)
    assert stream_seed(5, "client-batches", 3, 7) != stream_seed(6, "client-batches", 3, 7)
    assert stream_seed(5, "client-batches", 3, 7) != stream_seed(5, "client-batches", 7, 3)
    assert torch.equal(torch.randperm(50, generator=stream_generator(1, "cohort", 2)),
                       torch.randperm(50, generator=stream_generator(1, "cohort", 2)))
    assert (stream_rng(1, "test-subset").random(3) == stream_rng(1, "test-subset").random(3)).all()


def test_streams_never_share_a_seed_whatever_their_indices() -> None:
    """The case bare salts allowed: client 4242's batches in a round and the flatness probe of
    that round; and a stream with one index against another with the index split in two."""
    seeds = {(name, indices): stream_seed(0, name, *indices)
             for name in STREAMS
             for indices in [(), (4242,), (1, 4242), (4242, 1), (1729,), (1, 1729)]}
    assert len(set(seeds.values())) == len(seeds)
    for a, b in itertools.combinations(STREAMS, 2):
        assert stream_seed(0, a, 1) != stream_seed(0, b, 1)


def test_an_unknown_stream_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown seed stream 'batches'"):
        stream_seed(0, "batches")
