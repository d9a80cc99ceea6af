r"""The common step, fused: one sample (K = 1), one inner step, the gradients in ``p.grad``.

This is what an ordinary training loop runs every iteration, so it is written for speed: the
score and the two Adam updates are computed chunk by chunk with ``torch._foreach_*`` ops (the
Adam updates by torch's fused Adam kernel where :func:`torch_proxvi._functional.fused_adam` has
it), never building the Monte Carlo statistics of the general path, and :func:`sample_` draws the next
sample in place into the weights. Temporaries are bounded by the chunk (``CHUNK_NUMEL`` numbers
on the CPU, ``ACCELERATOR_CHUNK_NUMEL`` on a GPU, or one tensor if larger), not by the model;
``exp`` runs once for the gradient and once for the sample.

At ``q = q_t`` (the only inner step), with ``u = theta - mean`` and the score ``s``, the gradients
of :mod:`torch_proxvi._functional` reduce to

* ``d/d mean      = -2 s``  (``mean_update="score"``)  or  ``-2 (u / var_t + s)``  (``"residual"``),
* ``d/d log_scale = -4 (u^2 / var_t + u s)``,

and ``tests/test_fused.py`` checks them against the general path in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._functional import LOG_SCALE_MAX, LOG_SCALE_MIN, fused_adam
from ._random import normal_
from .families import gaussian

__all__ = ["fused_update", "sample_", "CHUNK_NUMEL"]

CHUNK_NUMEL = 1 << 21   # ~8 MB of float32 per temporary
#: on an accelerator each chunk costs some 30 kernel launches whatever its size, and a step at
#: 2M-number chunks was bound by them (H100, docs/benchmarks.md): there, chunks of 16M numbers
ACCELERATOR_CHUNK_NUMEL = 1 << 24


def _chunk_numel(chunk_numel: int | None, device: torch.device) -> int:
    if chunk_numel is not None:
        return chunk_numel
    return CHUNK_NUMEL if device.type == "cpu" else ACCELERATOR_CHUNK_NUMEL


def _chunks(sizes: list[int], limit: int) -> list[slice]:
    out, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if total and total + n > limit:
            out.append(slice(start, i))
            start, total = i, 0
        total += n
    out.append(slice(start, len(sizes)))
    return out


def fused_update(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    *,
    dataset_size: float,
    prior_precision: float,
    temperature: float,
    lr: float,
    scale_lr: float,
    betas: tuple[float, float],
    eps: float,
    mean_update: str,
    update_scale: bool,
    chunk_numel: int | None = None,
) -> None:
    """One K=1, single-inner-step update of ``states`` from the sample in ``params``.

    All states share device, dtype and step count (the optimizer batches them so).
    """
    beta1, beta2 = betas
    dtype = states[0]["mean"].dtype
    for st in states:
        st["step"] += 1
    step = float(states[0]["step"])
    for part in _chunks([p.numel() for p in params], _chunk_numel(chunk_numel, states[0]["mean"].device)):
        ps, sts = params[part], states[part]
        means = [st["mean"] for st in sts]
        log_scales = [st["log_scale"] for st in sts]
        theta = [p.detach() if p.dtype == dtype else p.detach().to(dtype) for p in ps]
        grad = [g if g.dtype == dtype else g.to(dtype) for g in grads[part]]
        # the score s = -N g / T - prior_precision (theta - prior_mean)
        score = torch._foreach_mul(grad, -dataset_size / temperature)
        priors = [st.get("prior_mean") for st in sts]
        if all(m is None for m in priors):
            torch._foreach_add_(score, theta, alpha=-prior_precision)
        else:
            centred = [t if m is None else t - m for t, m in zip(theta, priors)]
            torch._foreach_add_(score, centred, alpha=-prior_precision)
        u = torch._foreach_sub(theta, means)
        var = torch._foreach_mul(log_scales, 2.0)
        torch._foreach_exp_(var)                        # sigma_t^2
        if mean_update == "residual":                   # -2 (u / var + s)
            grad_mean = torch._foreach_div(u, var)
            torch._foreach_add_(grad_mean, score)
            torch._foreach_mul_(grad_mean, -2.0)
        else:                                           # -2 s
            grad_mean = torch._foreach_mul(score, -2.0)
        torch._foreach_mul_(score, u)                   # u s
        grad_log_scale = torch._foreach_mul(u, u)
        torch._foreach_div_(grad_log_scale, var)
        torch._foreach_add_(grad_log_scale, score)
        torch._foreach_mul_(grad_log_scale, -4.0)       # -4 (u^2 / var + u s)
        del score, var
        mean_avg = gaussian.first_moments(sts, "mean_exp_avg", beta1)
        fused_adam(means, grad_mean, mean_avg, [st["mean_exp_avg_sq"] for st in sts], step, lr,
                   beta1, beta2, eps)
        del grad_mean
        if update_scale:
            scale_avg = gaussian.first_moments(sts, "log_scale_exp_avg", beta1)
            fused_adam(log_scales, grad_log_scale, scale_avg, [st["log_scale_exp_avg_sq"] for st in sts],
                       step, scale_lr, beta1, beta2, eps)
            torch._foreach_clamp_min_(log_scales, LOG_SCALE_MIN)
            torch._foreach_clamp_max_(log_scales, LOG_SCALE_MAX)


def sample_(params: list[Tensor], states: list[dict], generator_of, chunk_numel: int | None = None) -> None:
    """Draw ``theta = mean + sigma * eps`` into ``params`` in place, in their order (the RNG
    stream is the same as drawing them one by one)."""
    runs: list[list[int]] = []
    for i, (p, st) in enumerate(zip(params, states)):
        key = (p.device, st["mean"].dtype)
        if runs and (params[runs[-1][0]].device, states[runs[-1][0]]["mean"].dtype) == key:
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        ps, sts = [params[i] for i in run], [states[i] for i in run]
        dtype, gen = sts[0]["mean"].dtype, generator_of(ps[0].device)
        for part in _chunks([p.numel() for p in ps], _chunk_numel(chunk_numel, ps[0].device)):
            chunk, chunk_states = ps[part], sts[part]
            scale = torch._foreach_exp([st["log_scale"] for st in chunk_states])
            noise = [p.detach() if p.dtype == dtype else torch.empty_like(st["mean"])
                     for p, st in zip(chunk, chunk_states)]
            for n in noise:
                normal_(n, gen)
            torch._foreach_mul_(noise, scale)
            torch._foreach_add_(noise, [st["mean"] for st in chunk_states])
            for p, n in zip(chunk, noise):
                if p.dtype != dtype:
                    p.detach().copy_(n)
