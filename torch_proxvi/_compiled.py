r"""The fused K=1 step as one compiled kernel per parameter (``compiled=True``).

:mod:`torch_proxvi._fused` runs the step as ~30 separate passes over memory plus torch's
generator for the noise; here the whole step (score, both Adam updates, the next sample) is one
function compiled by ``torch.compile`` (Inductor: vectorised C++ on CPU, Triton on CUDA), so each
weight is read and written once. The noise of the next sample comes from a counter-based hash
inside the kernel instead of torch's generator: splitmix64 of (seed, index) gives two 24-bit
uniforms and Box-Muller one standard normal. The per-step seeds are drawn from the optimizer's
own generator, so runs are repeatable and resume exactly from a ``state_dict``; the stream
differs from the eager path's (the update math is the same; ``tests/test_fused.py`` compares
them).
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import Tensor

from ._functional import LOG_SCALE_MAX, LOG_SCALE_MIN
from ._functional import _adam as adam
from .families import gaussian

__all__ = ["hash_normal", "compiled_step", "check_available"]

_GOLDEN = -7046029254386353131   # 0x9E3779B97F4A7C15 as int64
_GOLDEN_INVERSE = -1018231460777725123   # its inverse modulo 2**64: _GOLDEN * _GOLDEN_INVERSE = 1
_MIX1 = -4658895280553007687     # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685     # 0x94D049BB133111EB


def _shift(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def hash_normal(seed: Tensor, numel: int, dtype: torch.dtype, device) -> Tensor:
    """``numel`` standard normals from splitmix64(seed + i * golden), i = 0..numel-1."""
    # computed as (i + seed * golden^-1) * golden, the same number modulo 2**64: Inductor turns
    # i * golden into 32-bit index arithmetic on CUDA, where the constant does not fit; adding a
    # loaded value first keeps the product in int64
    z = (torch.arange(numel, dtype=torch.int64, device=device) + seed * _GOLDEN_INVERSE) * _GOLDEN
    z = (z ^ _shift(z, 30)) * _MIX1
    z = (z ^ _shift(z, 27)) * _MIX2
    z = z ^ _shift(z, 31)
    u1 = (_shift(z, 40).to(dtype) + 0.5) * (1.0 / (1 << 24))          # (0, 1)
    u2 = (_shift(z, 16) & 0xFFFFFF).to(dtype) * (1.0 / (1 << 24))       # [0, 1)
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def step_kernel(p: Tensor, grad: Tensor, mean: Tensor, log_scale: Tensor, mean_avg: Tensor | None,
                mean_avg_sq: Tensor, scale_avg: Tensor | None, scale_avg_sq: Tensor, prior_mean: Tensor | None,
                seed: Tensor, hyper: Tensor, residual: bool, update_scale: bool) -> None:
    """One parameter's step (see :mod:`torch_proxvi._fused` for the math); ``hyper`` holds
    lr, scale_lr, beta1, beta2, eps, -N/T, prior_precision and the Adam step count (tensors, so
    that changing them never recompiles)."""
    lr, scale_lr, beta1, beta2, eps, score_scale, prior_precision, step = hyper.unbind()
    theta = p.to(mean.dtype)
    centred = theta if prior_mean is None else theta - prior_mean
    score = grad.to(mean.dtype) * score_scale - prior_precision * centred
    u = theta - mean
    var = torch.exp(2 * log_scale)
    grad_mean = -2 * (u / var + score) if residual else -2 * score
    grad_log_scale = -4 * (u * u / var + u * score)
    adam(mean, grad_mean, mean_avg, mean_avg_sq, step, lr, beta1, beta2, eps)
    if update_scale:
        adam(log_scale, grad_log_scale, scale_avg, scale_avg_sq, step, scale_lr, beta1, beta2, eps)
        log_scale.clamp_(LOG_SCALE_MIN, LOG_SCALE_MAX)
    noise = hash_normal(seed, p.numel(), mean.dtype, mean.device).view(p.shape)
    p.copy_((mean + torch.exp(log_scale) * noise).to(p.dtype))


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
        _compiled_kernel = torch.compile(step_kernel, dynamic=True)
    return _compiled_kernel


def compiled_step(params: list[Tensor], states: list[dict], group: dict, generator: torch.Generator,
                  *, kernel=None) -> None:
    """The step of ``params`` (same device, dtype and step count) through the compiled kernel."""
    beta1, beta2 = group["betas"]
    first = gaussian.first_moments(states, "mean_exp_avg", beta1)
    if first is not None:
        gaussian.first_moments(states, "log_scale_exp_avg", beta1)
    for st in states:
        st["step"] += 1
    step = float(states[0]["step"])
    dtype, device = states[0]["mean"].dtype, states[0]["mean"].device
    hyper = torch.tensor([group["lr"], group["lr"] * group["scale_lr_ratio"], beta1, beta2, group["eps"],
                          -group["dataset_size"] / group["temperature"], group["prior_precision"], step],
                         dtype=dtype, device=device)
    base = torch.randint(-(2**62), 2**62, (1,), generator=generator, device=generator.device)
    seeds = base.to(device) + torch.arange(len(params), device=device) * 0x632BE59BD9B4E019
    fn = kernel or _kernel()
    update_scale = step - 1 >= group["warmup_steps"]
    residual = group["mean_update"] == "residual"
    for p, st, seed in zip(params, states, seeds):
        fn(p.detach(), p.grad, st["mean"], st["log_scale"], st.get("mean_exp_avg"), st["mean_exp_avg_sq"],
           st.get("log_scale_exp_avg"), st["log_scale_exp_avg_sq"], st.get("prior_mean"), seed, hyper,
           residual, update_scale)
