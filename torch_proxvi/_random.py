"""Standard-normal draws that do not depend on how a tensor is sharded.

For a plain tensor, :func:`normal_` is ``t.normal_(generator=...)``. For a DTensor (FSDP2's
``fully_shard`` parameters and the state made from them) it draws the whole global tensor from the
generator, which every rank holds in the same state, and keeps this rank's shard. Every world size
therefore writes the sample a single process would, and the generator advances alike on all ranks
(DTensor's own random ops would ignore the generator). The full draw is a transient of one
parameter's global size.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normal_", "is_dtensor"]

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
