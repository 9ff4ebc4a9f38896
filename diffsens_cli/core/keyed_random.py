"""Random numbers keyed by what they belong to (docs/design.md section 9).

Every Hutchinson probe and Wiener increment the engine draws is a function of
``(seed, stream, step, sample index, coordinate)`` alone, so a sample's numbers do not
depend on which chunk it was integrated in, which other samples shared that chunk, or
which cluster job computed it.  torch's generators are sequential (one state per
generator, consumed in order), so this is a counter-based generator written with tensor
ops: a 32-bit integer hash (``lowbias32`` from Chris Wellons' hash-prospector, a
bijection with good avalanche) of the key and the counter, computed in int64 with
products split into 16-bit halves so that nothing overflows on any device.  The same
key gives the same numbers on the CPU and on a GPU.
"""

from __future__ import annotations

import hashlib
import math

import torch

_MASK = 0xFFFFFFFF

# The streams the engine draws from; a new kind of random number gets a new stream.
PROBES = 1
WIENER = 2
POSTERIOR = 3  # which component the naive score's posterior draws pick (core.proxy_score)
POSTERIOR_NOISE = 4  # their Gaussian parts, within a component
EFFECTIVE_NOISE = 5  # the effective SDE's Gaussian score noise (core.proxy_score, noise="gaussian")


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for 32-bit words held in int64, without overflowing int64."""
    lo, hi = x & 0xFFFF, x >> 16
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & _MASK


def _hash(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijective mix of 32-bit words."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(seed: int, stream: int, step: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """One well-mixed 32-bit key per sample: [B, 1]."""
    k = 0
    for part in (seed, stream, step):
        k = int(_hash(torch.tensor((k + part) & _MASK)).item())
    return _hash((sample_ids.to(torch.int64)[:, None] + k) & _MASK)


def _bits(key: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` 32-bit words per key: [B, n]."""
    counters = _hash(torch.arange(n, device=key.device, dtype=torch.int64))
    return _hash(key ^ counters)


def _uniform(key: torch.Tensor, n: int) -> torch.Tensor:
    """Uniforms in (0, 1), float64 (32 bits of resolution)."""
    return (_bits(key, n).to(torch.float64) + 0.5) * (1.0 / 2**32)


def uniform(shape: tuple[int, ...], sample_ids: torch.Tensor, *, seed: int, stream: int, step: int) -> torch.Tensor:
    """Uniforms in (0, 1) [B, *shape], float64, for the samples ``sample_ids`` [B]."""
    return _uniform(_key(seed, stream, step, sample_ids), math.prod(shape)).view(len(sample_ids), *shape)


def normal(shape: tuple[int, ...], sample_ids: torch.Tensor, *, seed: int, stream: int, step: int,
           dtype: torch.dtype) -> torch.Tensor:
    """Standard normals [B, *shape] for the samples ``sample_ids`` [B] (Box-Muller)."""
    n = math.prod(shape)
    u = _uniform(_key(seed, stream, step, sample_ids), 2 * n)
    x = torch.sqrt(-2 * torch.log(u[:, :n])) * torch.cos(2 * math.pi * u[:, n:])
    return x.to(dtype).view(len(sample_ids), *shape)


def rademacher(shape: tuple[int, ...], sample_ids: torch.Tensor, *, seed: int, stream: int, step: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Uniform signs +-1 [B, *shape] for the samples ``sample_ids`` [B]."""
    bits = _bits(_key(seed, stream, step, sample_ids), math.prod(shape)) >> 31
    return (1 - 2 * bits).to(dtype).view(len(sample_ids), *shape)


def keyed_generator(*key: int | str) -> torch.Generator:
    """A sequential CPU generator seeded by a hash of ``key``, for whole draws that belong
    to one thing (a ranking's order, a random subset, a chunk of a projection): streams
    named apart never share a seed."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
