"""Randomness fit for differential privacy: a cryptographic keystream and untruncated Gaussians.

Every draw that an ε depends on (the Gaussian noise, and who is sampled in a DP round) comes from
a :class:`ChaChaSource`: the ChaCha20 stream cipher (RFC 8439, OpenSSL through ``cryptography``)
under a fresh 256-bit key read from the operating system for *each* release. Nothing of it is
kept: no seed or generator state is ever stored, checkpointed or reused, so a resumed run or a
replayed round draws new, independent noise, and the keystream cannot be wound back or predicted
from its outputs without breaking ChaCha20.

Gaussians are made in float64 by the Box-Muller transform from 53-bit uniforms
``u = (2k + 1) / 2^53`` (never 0 or 1). The uniform that sets the radius is drawn with unbounded
precision near 0 (a zero 52-bit block draws another block below it), so the tail is not cut at
any multiple of sigma that float64 can express (|z| up to about 38); float32 Box-Muller on 24-bit
uniforms, which torch uses on CPU, never exceeds |z| = 5.77. Noise is added in float64 and the
sum is rounded once to the tensor's dtype, so each float32 output cell spans about 2^29 float64
noise values in either neighbouring world: the low-order-bit attack on floating-point noise
(Mironov, CCS 2012) has no float64 pattern left to read in a float32 release. That is an argument,
not a proof: there is no exact discrete sampler here, and float64 releases (tests) keep float64's
own granularity. Timing side channels are out of scope.

``PLATEAU_TEST_SEED`` replaces the OS key by one derived from the seed and the draw's labels, for
tests of exact reproducibility only; a run where it is set anywhere reports no ε.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from typing import Protocol

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

TEST_SEED_ENV = "PLATEAU_TEST_SEED"
KEY_BYTES = 32  # ChaCha20's 256-bit key
CHUNK = 1 << 18  # values generated at a time: buffers stay in cache, memory stays bounded
MAX_STREAM_BYTES = 1 << 37  # half of ChaCha20's 2^32 64-byte blocks under one key and nonce
_MANTISSA = (1 << 52) - 1
_ONE_BITS = 0x3FF0000000000000  # float64 exponent bits of 1.0
_HALF_ULP = 2.0 ** -53
_LOWEST_CELL = 2.0 ** -52  # width of the cell the smallest uniform (2^-53) stands for

Tensors = dict[str, torch.Tensor]


def test_seed() -> int | None:
    """The PLATEAU_TEST_SEED environment variable, if set (testing only: NOT private)."""
    value = os.environ.get(TEST_SEED_ENV)
    return int(value) if value else None


class NoiseSource(Protocol):
    """Where uniforms and Gaussians come from (the real one, or a broken one in the audit)."""

    def uniform_(self, out: torch.Tensor) -> torch.Tensor:
        """Fill a contiguous float64 CPU tensor with uniforms in (0, 1)."""
        ...

    def normal_(self, out: torch.Tensor) -> torch.Tensor:
        """Fill a contiguous float64 tensor (any device) with standard normals."""
        ...


class ChaChaSource:
    """A ChaCha20 keystream turned into uniforms and Gaussians.

    Parameters
    ----------
    key : bytes
        32 bytes. Use :meth:`from_os` (or :func:`secure_source`); a key derived from anything
        public voids the privacy of every draw.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a ChaCha20 key has {KEY_BYTES} bytes, got {len(key)}")
        self._encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self._used = 0
        self._scratch: torch.Tensor | None = None

    @classmethod
    def from_os(cls) -> ChaChaSource:
        """A source under a fresh 256-bit key from the operating system's CSPRNG."""
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_test_seed(cls, seed: int, *labels: object) -> ChaChaSource:
        """A reproducible source for tests: the key hashes the seed and the draw's labels."""
        return cls(hashlib.sha256(repr(("plateau-test-seed", seed, labels)).encode()).digest())

    def fill_bytes(self, buffer: memoryview) -> None:
        """XOR the next keystream bytes onto ``buffer`` (zeros in, keystream out)."""
        self._used += buffer.nbytes
        if self._used > MAX_STREAM_BYTES:
            raise RuntimeError("a noise source was asked for more than 128 GiB; use a fresh one")
        self._encryptor.update_into(buffer, buffer)

    def uniform_(self, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (float64, CPU, contiguous) with (2k + 1)/2^53, k uniform on 52 bits.

        The keystream's bits become the mantissa of a float in [1, 2); subtracting 1 - 2^-53 is
        exact and centres every value in its cell, so the values are symmetric about 1/2.
        """
        if out.dtype != torch.float64 or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("uniform_ fills a contiguous float64 CPU tensor")
        if out.numel():
            out.zero_()  # the keystream is XORed onto the buffer: start from zeros
            self.fill_bytes(memoryview(out.numpy()).cast("B"))
            out.view(torch.int64).bitwise_and_(_MANTISSA).bitwise_or_(_ONE_BITS)
            out.sub_(1.0 - _HALF_ULP)
        return out

    def normal_(self, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (float64, contiguous, any device) with standard normals."""
        if self._scratch is None or self._scratch.numel() < min(out.numel(), CHUNK) + 1:
            self._scratch = torch.empty(min(out.numel(), CHUNK) + 1, dtype=torch.float64)
        return normal_from(self, out, self._scratch)


def normal_from(source: NoiseSource, out: torch.Tensor,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Box-Muller standard normals into ``out`` from ``source``'s uniforms, chunk by chunk.

    Uniforms are made on the CPU (the keystream is; ``scratch`` is a reusable float64 CPU
    buffer of at least CHUNK + 1 values) and moved to ``out``'s device once per chunk; the
    transform runs on that device.
    """
    if out.dtype != torch.float64 or not out.is_contiguous():
        raise ValueError("normal_ fills a contiguous float64 tensor")
    flat = out.view(-1)
    if scratch is None or scratch.numel() < min(flat.numel(), CHUNK) + 1:
        scratch = torch.empty(min(flat.numel(), CHUNK) + 1, dtype=torch.float64)
    for start in range(0, flat.numel(), CHUNK):
        target = flat[start:start + CHUNK]
        pairs = (target.numel() + 1) // 2
        uniforms = source.uniform_(scratch[:2 * pairs]).to(out.device)
        box_muller_(uniforms[:pairs], uniforms[pairs:], target, source)
    return out


def box_muller_(u_radius: torch.Tensor, u_angle: torch.Tensor, out: torch.Tensor,
                source: NoiseSource) -> torch.Tensor:
    """Write R·cos θ then R·sin θ into ``out``, R = sqrt(-2 ln u_radius), θ = 2π u_angle.

    Both inputs are overwritten. A radius uniform in the lowest cell (value 2^-53, standing for
    [0, 2^-52)) is refined by a fresh uniform scaled into that cell, as often as needed, so the
    radius, and with it the Gaussian's tail, has no cap short of float64's range.
    """
    pairs = u_radius.numel()
    lowest = u_radius == _HALF_ULP
    scale = 1.0
    while bool(lowest.any()):
        scale *= _LOWEST_CELL
        fresh = source.uniform_(torch.empty(int(lowest.sum()), dtype=torch.float64))
        fresh = fresh.to(u_radius.device)
        u_radius[lowest] = fresh * scale
        still_lowest = torch.zeros_like(lowest)
        still_lowest[lowest] = fresh == _HALF_ULP
        lowest = still_lowest
    radius = u_radius.log_().mul_(-2.0).sqrt_()
    angle = u_angle.mul_(2.0 * math.pi)
    torch.cos(angle, out=out[:pairs]).mul_(radius)
    rest = out.numel() - pairs
    out[pairs:].copy_(angle[:rest].sin_().mul_(radius[:rest]))
    return out


def add_noise(tensor: torch.Tensor, std: float, source: NoiseSource,
              support: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor`` + N(0, std²) per coordinate (only where ``support`` is 1), added in float64
    and rounded once to the tensor's dtype, on the tensor's device."""
    if std == 0:
        return tensor.clone()
    flat = tensor.detach().reshape(-1)
    result = torch.empty_like(flat)
    noise = torch.empty(min(flat.numel(), CHUNK), dtype=torch.float64, device=tensor.device)
    mask = support.reshape(-1) if support is not None else None
    for start in range(0, flat.numel(), CHUNK):
        stop = min(start + CHUNK, flat.numel())
        chunk = source.normal_(noise[:stop - start]).mul_(std)
        if mask is not None:
            chunk.mul_(mask[start:stop])
        result[start:stop].copy_(chunk.add_(flat[start:stop]))
    return result.view(tensor.shape)


def add_noise_all(tensors: Mapping[str, torch.Tensor], std: float, source: NoiseSource,
                  support: Mapping[str, torch.Tensor] | None = None) -> Tensors:
    """:func:`add_noise` on every tensor of a mapping, from one source."""
    return {k: add_noise(t, std, source, support[k] if support is not None else None)
            for k, t in tensors.items()}


def secret_key(*labels: object) -> bytes:
    """32 bytes from the operating system (or, with PLATEAU_TEST_SEED, from the seed and
    ``labels``): e.g. the key the audit's canary directions derive from."""
    seed = test_seed()
    if seed is None:
        return os.urandom(KEY_BYTES)
    return hashlib.sha256(repr(("plateau-test-key", seed, labels)).encode()).digest()


def secure_source(*labels: object) -> ChaChaSource:
    """A fresh source for one release: OS-keyed, or with PLATEAU_TEST_SEED set (tests only)
    keyed by the seed and ``labels`` (e.g. ("server-noise", round)), so a rerun of the same
    labelled draw repeats it exactly without any stored state."""
    seed = test_seed()
    return ChaChaSource.from_os() if seed is None else ChaChaSource.from_test_seed(seed, *labels)
