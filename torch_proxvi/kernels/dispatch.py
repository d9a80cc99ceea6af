"""One dispatcher for the common step: K = 1 sample, its gradient in ``p.grad``, the next sample
written into the weights. It picks how the rule's math (:data:`RULES`) is run:

``"single"``
    the reference: each tensor as it is, in canonical order (:func:`.layout.canonical_order`),
    noise from the optimizer's generator. Sharded (DTensor) parameters always take it.
``"flat"``
    the same functions on packed flat buffers (:func:`.layout.plan`): a few calls per step
    instead of one per tensor, a large tensor a chunk at a time. Same numbers as ``"single"``.
``"compiled"``
    the same functions on the same buffers, each call one ``torch.compile``d kernel (Inductor:
    vectorised C++ on the CPU, Triton on CUDA) that reads and writes each weight once; the noise
    comes from the in-kernel hash of :mod:`.noise` instead of torch's generator.

The optimizer's default is ``"compiled"`` where a compiler is available (:func:`resolve_compiled`,
checked once per process), else ``"flat"`` with a one-line notice. If a kernel fails to build,
that call and the rest run eagerly (same function, same hash noise) and a notice says so.
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch
from torch import Tensor

from . import gaussian, layout, newton
from .hyper import StepHyper
from .noise import hash_normal, is_dtensor, normal_, stream_keys
from .score import one_sample, score

__all__ = ["RULES", "PATHS", "step", "update_from_sample", "resolve_compiled", "compiler_available",
           "compiled_kernel", "kernel_body"]

#: ``StepHyper.rule`` -> the kernel module with its math: ``STATE`` (the per-weight tensors, in
#: packing order), ``update(state, stats, h)`` and ``sample(state, noise)``
RULES = {"proximal": gaussian, "elbo": gaussian, "solved": newton}
PATHS = ("single", "flat", "compiled")


def update_from_sample(rule, theta: Tensor, grad: Tensor, state: dict, h: StepHyper) -> None:
    """The K = 1 update: the score at ``theta`` from ``grad``, its statistics, the rule's update."""
    s = score(grad, theta, state.get("prior_mean"), h)
    rule.update(state, one_sample(theta - state["mean"], s), h)


def step(params: list[Tensor], states: list[dict], h: StepHyper, generator: torch.Generator, *, path: str,
         chunk: int | None = None, pack_all: bool | None = None, kernel=None) -> None:
    """The common step of ``params`` (one device, one state dtype, one step count) by ``path``.
    ``chunk``, ``pack_all`` override the layout's defaults and ``kernel`` the compiled kernel
    (tests compare layouts and the eager kernel body)."""
    rule = RULES[h.rule]
    if path not in PATHS:
        raise ValueError(f"Invalid path: {path!r} (choose one of {PATHS})")
    steps = [st["step"] for st in states]
    live = [i for i, p in enumerate(params) if p.numel()]   # a zero-element tensor has nothing to update
    params, states = [params[i] for i in live], [states[i] for i in live]
    if not params:   # (only its step count moves)
        pass
    elif path == "single" or any(is_dtensor(p) for p in params):
        _single(rule, params, states, h, generator)
    elif path == "flat":
        _flat(rule, params, states, h, generator, chunk, pack_all)
    else:
        _compiled(rule, params, states, h, generator, chunk, pack_all, kernel)
    torch._foreach_add_(steps, float(h.inner_steps))


def _single(rule, params, states, h, generator) -> None:
    order = layout.canonical_order([p.numel() for p in params])
    for i in order:
        p, state = params[i], states[i]
        dtype = state["mean"].dtype
        update_from_sample(rule, p.detach().to(dtype), p.grad.to(dtype), state, h)
    for i in order:
        p, state = params[i], states[i]
        noise = normal_(torch.empty_like(state["mean"], memory_format=torch.contiguous_format), generator)
        p.detach().copy_(rule.sample(state, noise))


def _names(rule, state: dict) -> list[str]:
    return [n for n in rule.STATE if n in state]


def _calls(rule, params, states, chunk, pack_all):
    names = _names(rule, states[0])

    def contiguous(i: int) -> bool:
        return layout.contiguous([params[i], params[i].grad, *(states[i][n] for n in names)])

    return names, layout.plan([p.numel() for p in params], contiguous, params[0].device, chunk, pack_all)


def _flat(rule, params, states, h, generator, chunk, pack_all) -> None:
    dtype = states[0]["mean"].dtype
    limit = layout.chunk_numel(chunk, params[0].device)
    names, calls = _calls(rule, params, states, chunk, pack_all)
    for indices, _, packed in calls:
        if packed:
            weights = [params[i].detach() for i in indices]
            theta = layout.flatten(weights).to(dtype)
            flat = {n: layout.flat_state(states, indices, n) for n in names}
            update_from_sample(rule, theta, layout.flatten([params[i].grad for i in indices]).to(dtype), flat, h)
            noise = theta                                   # theta is spent: its buffer takes the noise
            for piece in noise.split([w.numel() for w in weights]):
                normal_(piece, generator)
            torch._foreach_copy_(weights, layout.unflatten(rule.sample(flat, noise), weights))
            continue
        (i,) = indices
        weight, grad = params[i].detach().view(-1), params[i].grad.view(-1)
        arrays = {n: states[i][n].view(-1) for n in names}
        parts = layout.pieces(weight.numel(), limit)
        for piece in parts:
            update_from_sample(rule, weight[piece].to(dtype), grad[piece].to(dtype),
                               {n: a[piece] for n, a in arrays.items()}, h)
        if weight.dtype == dtype:                           # the noise straight into the weights
            normal_(weight, generator)
        for piece in parts:
            noise = weight[piece] if weight.dtype == dtype else normal_(
                torch.empty(piece.stop - piece.start, dtype=dtype, device=weight.device), generator)
            weight[piece].copy_(rule.sample({n: a[piece] for n, a in arrays.items()}, noise))


def kernel_body(p: Tensor, grad: Tensor, state: dict, key: Tensor, numbers: Tensor, static: tuple) -> None:
    """One call of the compiled path: the update and the next sample, the noise hashed from ``key``."""
    h = StepHyper.from_numbers(numbers, static)
    rule = RULES[h.rule]
    dtype = state["mean"].dtype
    update_from_sample(rule, p.to(dtype), grad.to(dtype), state, h)
    p.copy_(rule.sample(state, hash_normal(key, p.numel(), dtype, p.device)).to(p.dtype))


_kernel = None
_warned: set[str] = set()
_failed: set[str] = set()   # device types whose kernel failed to build: eager from then on


def compiled_kernel():
    """:func:`kernel_body` compiled (built on first use; one build serves every call shape)."""
    global _kernel
    if _kernel is None:
        # dynamic_threads: with dynamic shapes Inductor otherwise emitted a single-threaded CPU
        # loop (torch 2.14); OpenMP then picks the threads at run time (2.2x faster at 10M)
        _kernel = torch.compile(kernel_body, dynamic=True, options={"cpp.dynamic_threads": True})
    return _kernel


def _recompile_limit():
    """Room for every specialisation of the kernel (dtype, prior mean, first moments, rule, warm-up):
    past dynamo's default of 8 it would run the kernel eagerly, silently."""
    import torch._dynamo as dynamo

    name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    return dynamo.config.patch(**{name: max(64, getattr(dynamo.config, name))})


def _notice(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _compiled(rule, params, states, h, generator, chunk, pack_all, kernel) -> None:
    dtype, device = states[0]["mean"].dtype, params[0].device
    names, calls = _calls(rule, params, states, chunk, pack_all)
    seed = torch.randint(-(2**62), 2**62, (), generator=generator, device=generator.device).to(device)
    keys = stream_keys(seed, torch.tensor([start for _, start, _ in calls], dtype=torch.int64, device=device))
    numbers, static = h.numbers(dtype, device), h.static()
    fn = kernel or (kernel_body if device.type in _failed else compiled_kernel())
    with _recompile_limit():   # entered once per step: the patch costs ~40 us per call
        for (indices, _, packed), key in zip(calls, keys):
            if packed:
                weights = [params[i].detach() for i in indices]
                p = layout.flatten(weights).to(dtype)
                grad = layout.flatten([params[i].grad for i in indices]).to(dtype)
                state = {n: layout.flat_state(states, indices, n) for n in names}
            else:
                (i,) = indices
                p, grad = params[i].detach().view(-1), params[i].grad.view(-1)
                state = {n: states[i][n].view(-1) for n in names}
            try:
                fn(p, grad, state, key, numbers, static)
            except Exception as error:  # the build failed: nothing ran; run this call and the rest eagerly
                if fn is kernel_body:
                    raise
                _disable_compiler(device, error)
                fn = kernel_body
                fn(p, grad, state, key, numbers, static)
            if packed:
                torch._foreach_copy_(weights, layout.unflatten(p, weights))


# ---------------------------------------------------------------------------- is there a compiler
_available: dict[str, bool] = {}
ENV = "TORCH_PROXVI_COMPILE"


def compiler_available(device_type: str) -> bool:
    """Can Inductor build kernels for ``device_type`` here (a C++ compiler for the CPU, Triton for
    CUDA)? Checked once per process."""
    if device_type not in _available:
        if device_type == "cpu":
            compilers = [os.environ.get("CXX"), "g++", "clang++", "c++"]
            _available[device_type] = any(c and shutil.which(c) for c in compilers)
        elif device_type == "cuda":
            from torch.utils._triton import has_triton
            _available[device_type] = bool(has_triton())
        else:
            _available[device_type] = False
    return _available[device_type]


def _disable_compiler(device: torch.device, error: BaseException) -> None:
    _failed.add(device.type)
    _available[device.type] = False
    _notice(f"failed:{device.type}", f"torch_proxvi: the compiled step failed to build on {device.type} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); running it eagerly "
            f"from now on (same update, slower)")


def resolve_compiled(option: bool | None, devices: set[str]) -> bool:
    """``compiled=None`` (the default) -> True where every device has a compiler, unless the
    environment variable ``TORCH_PROXVI_COMPILE=0``; ``True`` -> an error where one is missing."""
    if option is None:
        env = os.environ.get(ENV, "").strip().lower()
        if env in ("0", "false", "no", "off"):
            return False
        missing = sorted(d for d in devices if not compiler_available(d))
        if missing:
            _notice(f"missing:{','.join(missing)}", f"torch_proxvi: no compiler for {', '.join(missing)} "
                    "(a C++ compiler such as g++ for the CPU, Triton for CUDA): the step runs eagerly, "
                    "about 2-3x slower; install one, or pass compiled=False to silence this")
            return False
        return True
    if option and "cpu" in devices and not compiler_available("cpu"):
        raise ValueError("compiled=True needs a C++ compiler for parameters on the CPU (torch.compile builds "
                         "the kernel with it): install g++ or clang++, or use compiled=False")
    return bool(option)
