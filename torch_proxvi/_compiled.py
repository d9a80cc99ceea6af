r"""The fused K=1 step as compiled kernels (``compiled=True``).

:mod:`torch_proxvi._fused` runs the step as some 20 separate passes over memory plus torch's
generator for the noise; here the whole step (score, both Adam updates, the next sample) is one
function compiled by ``torch.compile`` (Inductor: vectorised C++ on CPU, Triton on CUDA), so each
weight is read and written once. The eager path splits a batch into calls the same way on the CPU
(:func:`plan`, :func:`flat_state`).

**Calls.** Each call costs some 50 us on the CPU and 160 us on an H100 whatever its size, so
small tensors are not called one by one: a batch is put in a canonical order (tensors under
``SMALL_NUMEL`` numbers first, then the rest, each in the group's order) and consecutive tensors
are packed into one call of up to a chunk (:func:`torch_proxvi._fused._chunk_numel`). On the CPU
only the small tensors are packed (a copy costs more than a call there); on an accelerator every
tensor up to a chunk is. Tensors that are not contiguous are always packed. A packed call's
weights and gradients are copied into flat buffers and the weights copied back; its state lives
in flat buffers of its own (:func:`flat_state`), so the state is never copied.

**Noise.** The noise of the next sample comes from a counter-based hash inside the kernel
instead of torch's generator: the number at canonical offset ``o`` of a batch (its position in
the canonical order, counted in numbers) is splitmix64 of ``seed + o * golden``, which gives two
24-bit uniforms and, by Box-Muller, one standard normal. So the stream does not depend on how a
device packs or chunks the batch: the same seed gives the same sample on every device. The seed
is drawn each step from the optimizer's own generator, so runs are repeatable and resume exactly
from a ``state_dict``; the stream differs from the eager path's (the update math is the same;
``tests/test_fused.py`` compares them).
"""

from __future__ import annotations

import os
import shutil
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import _fused
from ._functional import LOG_SCALE_MAX, LOG_SCALE_MIN
from .families import gaussian

__all__ = ["hash_bits", "uniforms", "hash_normal", "stream_keys", "plan", "step_kernel", "hyperparameters",
           "compiled_step", "check_available", "flat_state", "flat_buffer_of", "SMALL_NUMEL"]

#: tensors with fewer numbers are stepped together, packed into shared calls
SMALL_NUMEL = 1 << 14
STATE_NAMES = ("mean", "log_scale", "mean_exp_avg", "mean_exp_avg_sq", "log_scale_exp_avg",
               "log_scale_exp_avg_sq", "prior_mean")

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
    """``numel`` standard normals, by Box-Muller from :func:`hash_bits` of ``key``.

    ``key = seed * golden^-1 + offset`` (modulo 2**64) gives splitmix64(seed + (offset + i) * golden),
    the numbers at offsets ``offset ...`` of seed ``seed``'s stream (:func:`stream_keys`).
    """
    u1, u2 = uniforms(hash_bits(key, numel, device), dtype)
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def stream_keys(seed: Tensor, offsets: Tensor) -> Tensor:
    """The keys of :func:`hash_normal` for the numbers at ``offsets`` of ``seed``'s stream."""
    return seed * _GOLDEN_INVERSE + offsets


def _adam(param: Tensor, grad: Tensor, exp_avg: Tensor | None, exp_avg_sq: Tensor, step_size: Tensor,
          beta1: Tensor, beta2: Tensor, eps: Tensor, bias2_sqrt_inverse: Tensor) -> None:
    """Adam in place, its bias corrections precomputed (``step_size = lr / (1 - beta1**t)``):
    inside the kernel they would be recomputed for every vector of numbers."""
    if exp_avg is not None:
        exp_avg.mul_(beta1).add_(grad * (1 - beta1))
    exp_avg_sq.mul_(beta2).add_(grad * grad * (1 - beta2))
    param.sub_(step_size * (grad if exp_avg is None else exp_avg) / (exp_avg_sq.sqrt() * bias2_sqrt_inverse + eps))


def step_kernel(p: Tensor, grad: Tensor, mean: Tensor, log_scale: Tensor, mean_avg: Tensor | None,
                mean_avg_sq: Tensor, scale_avg: Tensor | None, scale_avg_sq: Tensor, prior_mean: Tensor | None,
                key: Tensor, hyper: Tensor, residual: bool, update_scale: bool) -> None:
    """One parameter's step (see :mod:`torch_proxvi._fused` for the math), its noise
    :func:`hash_normal` of ``key``; ``hyper`` (:func:`hyperparameters`) is a tensor, so that
    changing a value never recompiles."""
    mean_step, scale_step, beta1, beta2, eps, bias2_sqrt_inverse, score_scale, prior_precision = hyper.unbind()
    theta = p.to(mean.dtype)
    centred = theta if prior_mean is None else theta - prior_mean
    score = grad.to(mean.dtype) * score_scale - prior_precision * centred
    u = theta - mean
    precision = torch.exp(-2 * log_scale)          # 1 / var: multiplications instead of divisions
    grad_mean = -2 * (u * precision + score) if residual else -2 * score
    grad_log_scale = -4 * (u * u * precision + u * score)
    _adam(mean, grad_mean, mean_avg, mean_avg_sq, mean_step, beta1, beta2, eps, bias2_sqrt_inverse)
    if update_scale:
        _adam(log_scale, grad_log_scale, scale_avg, scale_avg_sq, scale_step, beta1, beta2, eps,
              bias2_sqrt_inverse)
        log_scale.clamp_(LOG_SCALE_MIN, LOG_SCALE_MAX)
    noise = hash_normal(key, p.numel(), mean.dtype, mean.device).view(p.shape)
    p.copy_((mean + torch.exp(log_scale) * noise).to(p.dtype))


def hyperparameters(group: dict, step: float, dtype: torch.dtype, device) -> Tensor:
    """``hyper`` of :func:`step_kernel` for Adam step ``step`` of ``group``."""
    beta1, beta2 = group["betas"]
    bias1 = 1 - beta1**step
    return torch.tensor([group["lr"] / bias1, group["lr"] * group["scale_lr_ratio"] / bias1, beta1, beta2,
                         group["eps"], 1 / (1 - beta2**step) ** 0.5,
                         -group["dataset_size"] / group["temperature"], group["prior_precision"]],
                        dtype=dtype, device=device)


_compiled_kernel = None


def check_available(params: list[Tensor]) -> None:
    """Refuse ``compiled=True`` up front where Inductor cannot build the kernel (CPU, no C++)."""
    on_cpu = any(p.device.type == "cpu" for p in params)
    compilers = [os.environ.get("CXX"), "g++", "clang++", "c++"]
    if on_cpu and not any(c and shutil.which(c) for c in compilers):
        raise ValueError("compiled=True needs a C++ compiler for parameters on the CPU (torch.compile builds "
                         "the kernel with it): install g++ or clang++, or use compiled=False")


def _kernel():
    global _compiled_kernel
    if _compiled_kernel is None:
        # dynamic_threads: with dynamic shapes Inductor otherwise emitted a single-threaded CPU
        # loop here (torch 2.14); OpenMP then picks the threads at run time (2.2x faster at 10M)
        _compiled_kernel = torch.compile(step_kernel, dynamic=True, options={"cpp.dynamic_threads": True})
    return _compiled_kernel


def _contiguous(tensors) -> bool:
    return all(t is None or t.is_contiguous() for t in tensors)


def plan(sizes: list[int], contiguous: list[bool] | Callable[[int], bool], device: torch.device,
         chunk_numel: int | None = None, pack_all: bool | None = None) -> list[tuple[list[int], int, bool]]:
    """The calls of one batch: ``(indices, canonical offset of the first, packed)`` each.
    ``pack_all`` (default: on an accelerator) packs large tensors too, up to the chunk size.
    ``contiguous`` (whether all of a tensor's arrays are; a list, or a function of the index) is
    asked only about tensors large enough to be called on their own."""
    is_contiguous = contiguous.__getitem__ if isinstance(contiguous, list) else contiguous
    order = sorted(range(len(sizes)), key=lambda i: sizes[i] >= SMALL_NUMEL)
    limit = _fused._chunk_numel(chunk_numel, device)
    if pack_all is None:
        pack_all = device.type != "cpu"
    calls: list[tuple[list[int], int, bool]] = []
    run: list[int] = []
    run_start = run_numel = offset = 0
    for i in order:
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


def compiled_step(params: list[Tensor], states: list[dict], group: dict, generator: torch.Generator,
                  *, kernel=None, chunk_numel: int | None = None, pack_all: bool | None = None) -> None:
    """The step of ``params`` (same device, dtype and step count) through the compiled kernel."""
    beta1 = group["betas"][0]
    first = gaussian.first_moments(states, "mean_exp_avg", beta1)
    if first is not None:
        gaussian.first_moments(states, "log_scale_exp_avg", beta1)
    torch._foreach_add_([st["step"] for st in states], 1)
    step = float(states[0]["step"])
    dtype, device = states[0]["mean"].dtype, states[0]["mean"].device
    hyper = hyperparameters(group, step, dtype, device)
    update_scale = step - 1 >= group["warmup_steps"]
    residual = group["mean_update"] == "residual"
    names = [n for n in STATE_NAMES if n in states[0]]

    def arrays(i: int) -> dict[str, Tensor]:
        return {"p": params[i].detach(), "grad": params[i].grad, **{n: states[i][n] for n in names}}

    calls = plan([p.numel() for p in params], lambda i: _contiguous(arrays(i).values()), device, chunk_numel,
                 pack_all)
    seed = torch.randint(-(2**62), 2**62, (), generator=generator, device=generator.device).to(device)
    keys = stream_keys(seed, torch.tensor([start for _, start, _ in calls], dtype=torch.int64, device=device))
    fn = kernel or _kernel()
    for (indices, _, packed), key in zip(calls, keys):
        if packed:
            weights = [params[i].detach() for i in indices]
            flat = {"p": _flatten_dense_tensors(weights).to(dtype),
                    "grad": _flatten_dense_tensors([params[i].grad for i in indices]).to(dtype)}
            flat.update((n, flat_state(states, indices, n)) for n in names)
        else:
            flat = {k: v.view(-1) for k, v in arrays(indices[0]).items()}
        fn(flat["p"], flat["grad"], flat["mean"], flat["log_scale"], flat.get("mean_exp_avg"),
           flat["mean_exp_avg_sq"], flat.get("log_scale_exp_avg"), flat["log_scale_exp_avg_sq"],
           flat.get("prior_mean"), key, hyper, residual, update_scale)
        if packed:
            torch._foreach_copy_(weights, _unflatten_dense_tensors(flat["p"], weights))


def flat_state(states: list[dict], indices: list[int], name: str) -> Tensor:
    """State ``name`` of the tensors ``indices`` as one flat buffer that they are views of.

    The first packed step lays the state out so (one copy; the state tensors are replaced by
    views of the buffer, same values and shapes); later steps find the buffer and pass it to the
    kernel as it is, so only the weights and their gradients are copied in and out. The buffer
    remembers (by weak reference) the views it handed out: a state tensor that was replaced since
    (by assignment, ``load_state_dict``, new first moments) is laid out again.
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
