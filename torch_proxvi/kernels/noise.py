r"""The sampler's standard normals: torch's generator on the eager paths, a counter-based hash in
the compiled kernel.

**Eager.** :func:`normal_` is ``t.normal_(generator=...)``. For a DTensor (FSDP2's ``fully_shard``
parameters and the state made from them) it draws the whole global tensor from the generator,
which every rank holds in the same state, and keeps this rank's shard: every world size writes
the sample a single process would (DTensor's own random ops would ignore the generator).

**Compiled.** Inside a compiled kernel the noise comes from a hash instead: the number at
canonical offset ``o`` of a batch (its position in :func:`torch_proxvi.kernels.layout.plan`'s
order, counted in numbers) is splitmix64 of ``seed + o * golden``, which gives two 24-bit uniforms
and, by Box-Muller, one standard normal. So the stream does not depend on how a device packs or
chunks the batch. The seed is drawn each step from the optimizer's generator, so runs are
repeatable and resume exactly from a ``state_dict``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normal_", "is_dtensor", "hash_bits", "uniforms", "hash_normal", "stream_keys"]

try:  # torch.distributed is optional in some builds
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - builds without distributed
    DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


@torch.no_grad()
def normal_(t: Tensor, generator: torch.Generator | None) -> Tensor:
    """Fill ``t`` in place with N(0, 1) draws from ``generator``; returns ``t``."""
    if not is_dtensor(t):
        return t.normal_(generator=generator)
    local = t.to_local()
    full = torch.empty(t.shape, device=local.device, dtype=local.dtype).normal_(generator=generator)
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
    return t


_GOLDEN = -7046029254386353131   # 0x9E3779B97F4A7C15 as int64
_GOLDEN_INVERSE = -1018231460777725123   # its inverse modulo 2**64: _GOLDEN * _GOLDEN_INVERSE = 1
_MIX1 = -4658895280553007687     # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685     # 0x94D049BB133111EB


def _shift(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def hash_bits(key: Tensor, numel: int, device) -> Tensor:
    """``numel`` int64 words: splitmix64((key + i) * golden), i = 0..numel-1."""
    # the product is taken after adding the loaded key: Inductor turns a bare i * golden into
    # 32-bit index arithmetic on CUDA, where the constant does not fit
    z = (torch.arange(numel, dtype=torch.int64, device=device) + key) * _GOLDEN
    z = (z ^ _shift(z, 30)) * _MIX1
    z = (z ^ _shift(z, 27)) * _MIX2
    return z ^ _shift(z, 31)


def uniforms(bits: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Two 24-bit uniforms from each word: in (0, 1) (for the log) and in [0, 1)."""
    u1 = (_shift(bits, 40).to(dtype) + 0.5) * (1.0 / (1 << 24))
    u2 = (_shift(bits, 16) & 0xFFFFFF).to(dtype) * (1.0 / (1 << 24))
    return u1, u2


def hash_normal(key: Tensor, numel: int, dtype: torch.dtype, device) -> Tensor:
    """``numel`` standard normals, by Box-Muller from :func:`hash_bits` of ``key``
    (``key`` from :func:`stream_keys`)."""
    u1, u2 = uniforms(hash_bits(key, numel, device), dtype)
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def stream_keys(seed: Tensor, offsets: Tensor) -> Tensor:
    """The keys of :func:`hash_normal` for the numbers at ``offsets`` of ``seed``'s stream:
    ``seed * golden^-1 + offset`` (modulo 2**64) gives splitmix64(seed + (offset + i) * golden)."""
    return seed * _GOLDEN_INVERSE + offsets
