r"""The common step, fused: one sample (K = 1), one inner step, the gradients in ``p.grad``.

This is what an ordinary training loop runs every iteration, so it is written for speed: the
score and the two Adam updates are computed without the Monte Carlo statistics of the general
path, the Adam updates by torch's fused Adam kernel where :func:`torch_proxvi._functional.fused_adam`
has it, and :func:`sample_` draws the next sample in place into the weights.

At ``q = q_t`` (the only inner step), with ``u = theta - mean`` and the score ``s``, the gradients
of :mod:`torch_proxvi._functional` reduce to

* ``d/d mean      = -2 s``  (``mean_update="score"``)  or  ``-2 (u / var_t + s)``  (``"residual"``),
* ``d/d log_scale = -4 (u^2 / var_t + u s)``,

computed with the general path's operations in its order, so that both give the same numbers
(``tests/test_fused.py`` compares them in float64, ``tests/test_properties.py`` in float32).

**On the CPU** the arrays are flat (:func:`update_on_flat_arrays`). The batch is split into calls
as the compiled step splits it (:func:`torch_proxvi._compiled.plan`): a large contiguous tensor
is stepped on its own, small ones are packed together, their state living in flat buffers
(:func:`torch_proxvi._compiled.flat_state`) and their weights and gradients copied in. Each
operation is then one multi-threaded pass, and the temporaries come from a :class:`Workspace`
kept between steps: a fresh allocation each step costs the kernel's page faults, more than the
arithmetic (docs/benchmarks.md). **Elsewhere** the step is ``torch._foreach_*`` ops, chunk by
chunk: sharded (DTensor) parameters cannot be packed, and on accelerators, whose allocators cache
and whose foreach ops are multi-tensor kernels, the flat path has not been measured. Either way temporaries are bounded by the chunk
(``CHUNK_NUMEL`` numbers on the CPU, ``ACCELERATOR_CHUNK_NUMEL`` on a GPU) or one tensor if
larger, not by the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _compiled
from ._functional import LOG_SCALE_MAX, LOG_SCALE_MIN, fused_adam
from ._random import is_dtensor, normal_
from .families import gaussian

__all__ = ["fused_update", "update_on_flat_arrays", "sample_", "Workspace", "CHUNK_NUMEL"]

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


class Workspace:
    """Temporaries of the CPU's fused step, kept between steps: one flat buffer per dtype, as
    large as the largest call so far needed."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, Tensor] = {}

    def get(self, count: int, numel: int, dtype: torch.dtype) -> list[Tensor]:
        """``count`` flat tensors of ``numel`` numbers, distinct from each other."""
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < count * numel:
            buffer = self._buffers[dtype] = torch.empty(count * numel, dtype=dtype, device="cpu")
        return list(buffer[:count * numel].view(count, numel).unbind())

    @property
    def nbytes(self) -> int:
        """Bytes held between steps."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def _flat_path(params: list[Tensor], states: list[dict]) -> bool:
    device = states[0]["mean"].device
    keys = states[0].keys()
    return device.type == "cpu" and all(
        p.device == device and not is_dtensor(p) and st.keys() == keys for p, st in zip(params, states))


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
    workspace: Workspace | None = None,
) -> None:
    """One K=1, single-inner-step update of ``states`` from the sample in ``params``.

    All states share device, dtype and step count (the optimizer batches them so).
    """
    beta1 = betas[0]
    for st in states:
        st["step"] += 1
    gaussian.first_moments(states, "mean_exp_avg", beta1)
    if update_scale:
        gaussian.first_moments(states, "log_scale_exp_avg", beta1)
    hyper = dict(dataset_size=dataset_size, prior_precision=prior_precision, temperature=temperature, lr=lr,
                 scale_lr=scale_lr, betas=betas, eps=eps, mean_update=mean_update, update_scale=update_scale,
                 step=float(states[0]["step"]))
    if _flat_path(params, states):
        update_on_flat_arrays(params, grads, states, chunk_numel=chunk_numel, workspace=workspace or Workspace(),
                              **hyper)
    else:
        _update_by_foreach(params, grads, states, chunk_numel=chunk_numel, **hyper)


def _adam_steps(means, log_scales, grad_mean, grad_log_scale, states, *, step, lr, scale_lr, betas, eps,
                update_scale) -> None:
    """Both Adam steps of one call; ``states`` give the moments (as lists, index for index)."""
    beta1, beta2 = betas

    def moments(name):
        return None if beta1 == 0 else [st[name] for st in states]

    fused_adam(means, grad_mean, moments("mean_exp_avg"), [st["mean_exp_avg_sq"] for st in states], step, lr,
               beta1, beta2, eps)
    if update_scale:
        fused_adam(log_scales, grad_log_scale, moments("log_scale_exp_avg"),
                   [st["log_scale_exp_avg_sq"] for st in states], step, scale_lr, beta1, beta2, eps)
        if len(log_scales) == 1:
            log_scales[0].clamp_(LOG_SCALE_MIN, LOG_SCALE_MAX)
        else:
            torch._foreach_clamp_min_(log_scales, LOG_SCALE_MIN)
            torch._foreach_clamp_max_(log_scales, LOG_SCALE_MAX)


def update_on_flat_arrays(params, grads, states, *, chunk_numel=None, workspace: Workspace, **hyper) -> None:
    """:func:`fused_update` on flat arrays, one call of :func:`torch_proxvi._compiled.plan` at a
    time. A tensor called on its own is stepped a chunk at a time, so the workspace holds six
    chunks at most (more only for a non-contiguous tensor larger than a chunk, packed alone)."""
    dtype, device = states[0]["mean"].dtype, states[0]["mean"].device
    names = [n for n in _compiled.STATE_NAMES if n in states[0]]
    limit = _chunk_numel(chunk_numel, device)

    def contiguous(i: int) -> bool:
        return _compiled._contiguous([params[i], grads[i], *(states[i][n] for n in names)])

    sizes = [p.numel() for p in params]
    for indices, _, packed in _compiled.plan(sizes, contiguous, device, chunk_numel):
        if packed:
            theta, grad, *temporaries = workspace.get(6, sum(sizes[i] for i in indices), dtype)
            torch.cat([params[i].detach().reshape(-1) for i in indices], out=theta)
            torch.cat([grads[i].reshape(-1) for i in indices], out=grad)
            _update_flat({n: _compiled.flat_state(states, indices, n) for n in names}, theta, grad, temporaries,
                         **hyper)
            continue
        (i,) = indices
        arrays = {n: states[i][n].view(-1) for n in names}
        theta, grad = params[i].detach().view(-1), grads[i].view(-1)
        for start in range(0, sizes[i], limit):
            piece = slice(start, start + limit)
            inputs = [theta[piece], grad[piece]]
            converted = [t.dtype != dtype for t in inputs]
            temporaries = workspace.get(4 + sum(converted), inputs[0].numel(), dtype)
            for k in (0, 1):
                if converted[k]:
                    inputs[k] = temporaries.pop().copy_(inputs[k])
            _update_flat({n: a[piece] for n, a in arrays.items()}, *inputs, temporaries, **hyper)


def _update_flat(flat: dict[str, Tensor], theta: Tensor, grad: Tensor, temporaries: list[Tensor], *,
                 dataset_size, prior_precision, temperature, mean_update, **adam) -> None:
    """The step of one flat piece: ``flat`` its state arrays, ``temporaries`` four free arrays."""
    score, u, var, grad_mean = temporaries
    # the score s = -N g / T - prior_precision (theta - prior_mean)
    torch.mul(grad, -dataset_size / temperature, out=score)
    if "prior_mean" in flat:
        score.add_(torch.sub(theta, flat["prior_mean"], out=u), alpha=-prior_precision)
    else:
        score.add_(theta, alpha=-prior_precision)
    torch.sub(theta, flat["mean"], out=u)
    torch.mul(flat["log_scale"], 2.0, out=var).exp_()               # sigma_t^2
    if mean_update == "residual":                                   # -2 (u / var + s)
        torch.div(u, var, out=grad_mean).add_(score).mul_(-2.0)
    else:                                                           # -2 s
        torch.mul(score, -2.0, out=grad_mean)
    score.mul_(u)                                                   # u s
    grad_log_scale = u.mul_(u).div_(var).add_(score).mul_(-4.0)      # -4 (u^2 / var + u s)
    _adam_steps([flat["mean"]], [flat["log_scale"]], [grad_mean], [grad_log_scale], [flat], **adam)


def _update_by_foreach(params, grads, states, *, dataset_size, prior_precision, temperature, mean_update,
                       chunk_numel=None, **hyper) -> None:
    """:func:`fused_update` as ``torch._foreach_*`` ops on the tensors as they are, chunk by chunk."""
    dtype = states[0]["mean"].dtype
    for part in _chunks([p.numel() for p in params], _chunk_numel(chunk_numel, states[0]["mean"].device)):
        ps, sts = params[part], states[part]
        means = [st["mean"] for st in sts]
        log_scales = [st["log_scale"] for st in sts]
        theta = [p.detach() if p.dtype == dtype else p.detach().to(dtype) for p in ps]
        grad = [g if g.dtype == dtype else g.to(dtype) for g in grads[part]]
        score = torch._foreach_mul(grad, -dataset_size / temperature)
        priors = [st.get("prior_mean") for st in sts]
        if all(m is None for m in priors):
            torch._foreach_add_(score, theta, alpha=-prior_precision)
        else:
            centred = [t if m is None else t - m for t, m in zip(theta, priors)]
            torch._foreach_add_(score, centred, alpha=-prior_precision)
        u = torch._foreach_sub(theta, means)
        var = torch._foreach_mul(log_scales, 2.0)
        torch._foreach_exp_(var)                                     # sigma_t^2
        if mean_update == "residual":                                # -2 (u / var + s)
            grad_mean = torch._foreach_div(u, var)
            torch._foreach_add_(grad_mean, score)
            torch._foreach_mul_(grad_mean, -2.0)
        else:                                                        # -2 s
            grad_mean = torch._foreach_mul(score, -2.0)
        torch._foreach_mul_(score, u)                                # u s
        grad_log_scale = torch._foreach_mul(u, u)
        torch._foreach_div_(grad_log_scale, var)
        torch._foreach_add_(grad_log_scale, score)
        torch._foreach_mul_(grad_log_scale, -4.0)                    # -4 (u^2 / var + u s)
        del score, var, u
        _adam_steps(means, log_scales, grad_mean, grad_log_scale, sts, **hyper)


def sample_(params: list[Tensor], states: list[dict], generator_of, chunk_numel: int | None = None,
            workspace: Workspace | None = None) -> None:
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
        dtype, device = sts[0]["mean"].dtype, ps[0].device
        if device.type == "cpu" and all(p.dtype == dtype and not is_dtensor(p) for p in ps):
            _sample_on_flat_arrays(ps, sts, generator_of(device), chunk_numel, workspace or Workspace())
        else:
            _sample_by_foreach(ps, sts, generator_of(device), chunk_numel)


def _sample_on_flat_arrays(params, states, generator, chunk_numel, workspace: Workspace) -> None:
    """:func:`sample_` of weights in the state dtype on the CPU: the noise straight into the
    weights, ``exp(log_scale)`` into the workspace (one pass for a packed call's flat buffer)."""
    weights = [p.detach() for p in params]
    for w in weights:
        normal_(w, generator)
    dtype, device = states[0]["mean"].dtype, weights[0].device
    limit = _chunk_numel(chunk_numel, device)

    def contiguous(i: int) -> bool:
        return _compiled._contiguous([weights[i], states[i]["mean"], states[i]["log_scale"]])

    sizes = [w.numel() for w in weights]
    for indices, _, packed in _compiled.plan(sizes, contiguous, device, chunk_numel):
        # multiply, then add, as every other path does (addcmul rounds differently)
        if not packed:
            (i,) = indices
            weight, mean, log_scale = (t.view(-1) for t in (weights[i], states[i]["mean"], states[i]["log_scale"]))
            for start in range(0, sizes[i], limit):
                piece = slice(start, start + limit)
                (scale,) = workspace.get(1, weight[piece].numel(), dtype)
                weight[piece].mul_(torch.exp(log_scale[piece], out=scale)).add_(mean[piece])
            continue
        ws, means = [weights[i] for i in indices], [states[i]["mean"] for i in indices]
        log_scales = [states[i]["log_scale"] for i in indices]
        (scale,) = workspace.get(1, sum(sizes[i] for i in indices), dtype)
        scales = [s.view(w.shape) for s, w in zip(scale.split([sizes[i] for i in indices]), ws)]
        flat = _compiled.flat_buffer_of(log_scales)
        if flat is not None:
            torch.exp(flat, out=scale)
        else:
            for log_scale, s in zip(log_scales, scales):
                torch.exp(log_scale, out=s)
        torch._foreach_mul_(ws, scales)
        torch._foreach_add_(ws, means)


def _sample_by_foreach(params, states, generator, chunk_numel) -> None:
    dtype = states[0]["mean"].dtype
    for part in _chunks([p.numel() for p in params], _chunk_numel(chunk_numel, params[0].device)):
        chunk, chunk_states = params[part], states[part]
        scale = torch._foreach_exp([st["log_scale"] for st in chunk_states])
        noise = [p.detach() if p.dtype == dtype else torch.empty_like(st["mean"])
                 for p, st in zip(chunk, chunk_states)]
        for n in noise:
            normal_(n, generator)
        torch._foreach_mul_(noise, scale)
        torch._foreach_add_(noise, [st["mean"] for st in chunk_states])
        for p, n in zip(chunk, noise):
            if p.dtype != dtype:
                p.detach().copy_(n)
