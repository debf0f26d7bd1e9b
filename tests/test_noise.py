"""The noise source: a cryptographic keystream under a full-entropy key, untruncated float64
Gaussians, noise added in float64 and rounded once, and nothing reproducible without the test
seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import plateau.privacy.noise as noise
from plateau.privacy.noise import ChaChaSource, add_noise, box_muller_, secure_source


class FixedUniforms:
    """A source that hands out given uniforms (to drive the transform to its extremes)."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def uniform_(self, out: torch.Tensor) -> torch.Tensor:
        taken, self.values = self.values[:out.numel()], self.values[out.numel():]
        return out.copy_(torch.tensor(taken, dtype=torch.float64))

    def normal_(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def test_torch_cpu_generator_keeps_only_32_seed_bits() -> None:
    """Why torch's generator is not the noise source: seeds equal in their low 32 bits give
    the same draws, so a 63-bit seed has 32 bits of entropy (an hour of brute force)."""
    def draws(seed: int) -> torch.Tensor:
        return torch.randn(5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draws((1 << 40) + 7), draws(7))


@pytest.mark.parametrize("bit", [0, 31, 32, 63, 64, 127, 128, 200, 255])
def test_every_key_bit_changes_the_stream(bit: int) -> None:
    key = bytearray(32)
    flipped = bytearray(32)
    flipped[bit // 8] ^= 1 << (bit % 8)
    a = ChaChaSource(bytes(key)).normal_(torch.empty(8, dtype=torch.float64))
    b = ChaChaSource(bytes(flipped)).normal_(torch.empty(8, dtype=torch.float64))
    assert not torch.equal(a, b)


def test_each_release_reads_a_fresh_256_bit_key_from_the_os(
        monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[int] = []
    real = noise.os.urandom

    def spy(count: int) -> bytes:
        requested.append(count)
        return real(count)

    monkeypatch.setattr(noise.os, "urandom", spy)
    monkeypatch.delenv(noise.TEST_SEED_ENV, raising=False)
    first = add_noise(torch.zeros(100), 1.0, secure_source("server-noise", 1))
    second = add_noise(torch.zeros(100), 1.0, secure_source("server-noise", 1))
    assert requested == [32, 32] and not torch.equal(first, second)


def test_the_test_seed_keys_by_seed_and_labels_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(noise.TEST_SEED_ENV, "5")
    again = [add_noise(torch.zeros(10), 1.0, secure_source("client-noise", 3, 1))
             for _ in range(2)]
    other = add_noise(torch.zeros(10), 1.0, secure_source("client-noise", 4, 1))
    assert torch.equal(again[0], again[1]) and not torch.equal(again[0], other)


def test_uniforms_are_centred_53_bit_values_never_0_or_1() -> None:
    out = ChaChaSource.from_os().uniform_(torch.empty(200_000, dtype=torch.float64))
    assert float(out.min()) > 0.0 and float(out.max()) < 1.0
    cells = out * 2.0 ** 53  # (2k + 1): odd integers
    assert torch.equal(cells, cells.round()) and bool((cells.remainder(2) == 1).all())
    assert abs(float(out.mean()) - 0.5) < 5 / math.sqrt(12 * 200_000)


def test_the_radius_has_no_float32_cap() -> None:
    """float32 Box-Muller on 24-bit uniforms never exceeds |z| = 5.77; from 53-bit uniforms the
    second-smallest radius uniform alone gives 8.44."""
    out = torch.empty(2, dtype=torch.float64)
    box_muller_(torch.tensor([3 * 2.0 ** -53], dtype=torch.float64),
                torch.tensor([0.0], dtype=torch.float64), out, FixedUniforms([]))
    assert out[0] == pytest.approx(math.sqrt(-2 * math.log(3 * 2.0 ** -53)))
    assert out[0] > 8.4 > 5.77


def test_the_lowest_cell_is_refined_so_the_tail_is_unbounded() -> None:
    """The smallest uniform stands for [0, 2^-52): it is refined by fresh uniforms, twice here,
    and the radius goes past what any single 53-bit uniform can give."""
    refinements = FixedUniforms([2.0 ** -53, 0.5])
    out = torch.empty(2, dtype=torch.float64)
    box_muller_(torch.tensor([2.0 ** -53], dtype=torch.float64),
                torch.tensor([0.0], dtype=torch.float64), out, refinements)
    u = 0.5 * 2.0 ** -104
    assert out[0] == pytest.approx(math.sqrt(-2 * math.log(u)))
    assert out[0] > 12.0


def test_gaussians_pass_a_distribution_test_with_the_right_tail_mass() -> None:
    """A fixed key (the sampler's distribution does not depend on it): a KS p-value is uniform
    for a correct sampler, so on OS keys the 1e-4 threshold would fail one run in 10,000."""
    z = ChaChaSource(bytes(range(32))).normal_(torch.empty(2_000_000, dtype=torch.float64)).numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert abs(z.mean()) < 6 / math.sqrt(len(z)) and abs(z.std() - 1) < 6 / math.sqrt(2 * len(z))
    expected = 2 * stats.norm.sf(4.0) * len(z)  # ~127 beyond 4 sigma
    assert abs((np.abs(z) > 4.0).sum() - expected) < 6 * math.sqrt(expected)


def test_noise_is_added_in_float64_and_rounded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The release is round32(x + std * z) with z in float64: not x + round32(std * z)."""
    monkeypatch.setenv(noise.TEST_SEED_ENV, "9")
    x = torch.full((10_000,), 1.0 + 2.0 ** -20, dtype=torch.float32)
    released = add_noise(x, 1e-7, secure_source("check"))
    z = secure_source("check").normal_(torch.empty(10_000, dtype=torch.float64))
    assert torch.equal(released, (x.double() + 1e-7 * z).float())


def test_masked_noise_only_on_the_support() -> None:
    support = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = add_noise(torch.zeros(4), 1.0, ChaChaSource.from_os(), support)
    assert out[1] == 0 and out[3] == 0 and out[0] != 0 and out[2] != 0


def test_large_tensors_are_noised_in_chunks_on_their_shape() -> None:
    tensor = torch.zeros(3, noise.CHUNK + 17)
    out = add_noise(tensor, 2.0, ChaChaSource.from_os())
    assert out.shape == tensor.shape and out.dtype == torch.float32
    assert float(out.std()) == pytest.approx(2.0, rel=0.01)
    # chunks are not repeats of each other
    flat = out.reshape(-1)
    assert not torch.equal(flat[:100], flat[noise.CHUNK:noise.CHUNK + 100])
