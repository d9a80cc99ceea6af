"""How a batch of tensors is laid out for the fast paths: the calls of a step, packed flat
buffers, chunk sizes. No update math here.

**Calls.** Each call of a kernel costs some 50 us on the CPU and 160 us on an H100 whatever its
size, so small tensors are not stepped one by one: a batch is put in a canonical order (tensors
under :data:`SMALL_NUMEL` numbers first, then the rest, each in the group's order) and
consecutive tensors are packed into one call of up to a chunk (:func:`chunk_numel`). On the CPU
only the small tensors are packed (a copy costs more than a call there); on an accelerator every
tensor up to a chunk is. Tensors that are not contiguous are always packed. A packed call's
weights and gradients are copied into flat buffers; its state lives in flat buffers of its own
(:func:`flat_state`), so the state is never copied.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["SMALL_NUMEL", "CHUNK_NUMEL", "ACCELERATOR_CHUNK_NUMEL", "chunk_numel", "canonical_order", "plan",
           "pieces", "contiguous", "flat_state", "flat_buffer_of", "flatten", "unflatten"]

#: tensors with fewer numbers are stepped together, packed into shared calls
SMALL_NUMEL = 1 << 14
CHUNK_NUMEL = 1 << 21   # ~8 MB of float32 per temporary
#: on an accelerator each chunk costs some 30 kernel launches whatever its size, and a step at
#: 2M-number chunks was bound by them (H100, docs/benchmarks.md): there, chunks of 16M numbers
ACCELERATOR_CHUNK_NUMEL = 1 << 24

flatten = _flatten_dense_tensors
unflatten = _unflatten_dense_tensors


def chunk_numel(override: int | None, device: torch.device) -> int:
    if override is not None:
        return override
    return CHUNK_NUMEL if device.type == "cpu" else ACCELERATOR_CHUNK_NUMEL


def canonical_order(sizes: list[int]) -> list[int]:
    """Small tensors first, then the large ones, each in the given order."""
    return sorted(range(len(sizes)), key=lambda i: sizes[i] >= SMALL_NUMEL)


def plan(sizes: list[int], is_contiguous: Callable[[int], bool], device: torch.device,
         chunk: int | None = None, pack_all: bool | None = None) -> list[tuple[list[int], int, bool]]:
    """The calls of one batch: ``(indices, canonical offset of the first, packed)`` each.

    ``pack_all`` (default: on an accelerator) packs large tensors too, up to the chunk size.
    ``is_contiguous(i)`` (whether all of tensor ``i``'s arrays are) is asked only about tensors
    large enough to be called on their own."""
    limit = chunk_numel(chunk, device)
    if pack_all is None:
        pack_all = device.type != "cpu"
    calls: list[tuple[list[int], int, bool]] = []
    run: list[int] = []
    run_start = run_numel = offset = 0
    for i in canonical_order(sizes):
        n = sizes[i]
        direct = (n >= limit or (not pack_all and n >= SMALL_NUMEL)) and is_contiguous(i)
        if run and (direct or run_numel + n > limit):
            calls.append((run, run_start, True))
            run = []
        if direct:
            calls.append(([i], offset, False))
        else:
            if not run:
                run_start, run_numel = offset, 0
            run.append(i)
            run_numel += n
        offset += n
    if run:
        calls.append((run, run_start, True))
    return calls


def pieces(numel: int, limit: int) -> list[slice]:
    """Consecutive slices of at most ``limit`` numbers covering ``numel``, each but the last a
    multiple of 16 long; a last piece under 16 numbers joins the one before. Then drawing the
    noise piece by piece gives the same stream as drawing it at once (torch's CPU sampler works
    in blocks of 16 and redraws a partial last block)."""
    limit = max(16, limit - limit % 16)
    starts = list(range(0, numel, limit))
    if len(starts) > 1 and numel - starts[-1] < 16:
        starts.pop()
    return [slice(s, e) for s, e in zip(starts, starts[1:] + [numel])]


def contiguous(tensors) -> bool:
    return all(t is None or t.is_contiguous() for t in tensors)


def flat_state(states: list[dict], indices: list[int], name: str) -> Tensor:
    """State ``name`` of the tensors ``indices`` as one flat buffer that they are views of.

    The first packed step lays the state out so (one copy; the state tensors are replaced by
    views of the buffer, same values and shapes); later steps find the buffer and use it as it
    is. The buffer remembers (by weak reference) the views it handed out: a state tensor that was
    replaced since (by assignment, ``load_state_dict``, new first moments) is laid out again.
    """
    views = [states[i][name] for i in indices]
    base = flat_buffer_of(views)
    if base is not None:
        return base
    flat = _flatten_dense_tensors(views)
    views = _unflatten_dense_tensors(flat, views)
    for i, view in zip(indices, views):
        states[i][name] = view
    flat._proxvi_views = [weakref.ref(v) for v in views]
    return flat


def flat_buffer_of(views: list[Tensor]) -> Tensor | None:
    """The buffer laid out by :func:`flat_state` whose views are ``views``, in this order, or None."""
    base = views[0]._base
    made = getattr(base, "_proxvi_views", None)
    if made is not None and len(made) == len(views) and all(r() is v for r, v in zip(made, views)):
        return base
    return None
