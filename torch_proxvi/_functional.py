r"""The proximal score-matching update for the mean-field Gaussian family.

Notation (per weight, element-wise; ``var = exp(2 * log_scale)``):

* ``q_t = N(mean_t, var_t)`` is the posterior iterate the samples were drawn from,
* ``theta_k = mean_t + scale_t * eps_k`` (k = 1..K) are those samples, ``u_k = theta_k - mean_t``,
* ``s_k = -N * grad_k / T - prior_precision * (theta_k - prior_mean)`` is the score estimate,
* ``grad log q(theta) = -(theta - mean) / var``.

One step moves ``(mean, log_scale)`` toward

.. math::

    \arg\min_q \frac1K \sum_k \big\| \sigma_t \odot (\nabla\log q(\theta_k) - \hat s_k) \big\|^2
        + \lambda_{prox}\, \mathrm{KL}(q \,\|\, q_t)

by ``inner_steps`` Adam steps. The objective only needs four Monte Carlo averages per weight,
taken about ``mean_t``: ``u_mean = <u>``, ``u_sq_mean = <u^2>``, ``score_mean = <s>`` and
``u_score_mean = <u s>`` (:class:`ScoreStats`). With ``d_k = theta_k - mean = u_k - delta``,
``delta = mean - mean_t``, the gradients are

* ``d/d mean      = 2 (var_t / var) (-<d> / var - <s>)  + prox * delta / var_t``
* ``d/d log_scale = 4 (var_t / var) (-<d^2> / var - <d s>) + prox * (var / var_t - 1)``

``mean_update="score"`` replaces the first line's residual by ``-2 <s>``: the control variate
``-<d> / var`` is dropped (see docs/method.md for when each is better).

This module has a single-tensor version that reads like the math and a multi-tensor
(``torch._foreach_*``) version that must agree with it to 1e-12 in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._random import is_dtensor

__all__ = ["ScoreStats", "score", "accumulate_stats", "adam_step", "proximal_gradients",
           "gaussian_update", "elbo_gradients", "foreach_adam",
           "fused_adam", "FUSED_ADAM_DEVICES"]

# exp(2 * log_scale) must stay a normal float32 number: std in [exp(-30), exp(20)].
LOG_SCALE_MIN = -30.0
LOG_SCALE_MAX = 20.0


@dataclass
class ScoreStats:
    """Monte Carlo averages over the K samples of one step, for one parameter (float32/64)."""

    u_mean: Tensor
    u_sq_mean: Tensor
    score_mean: Tensor
    u_score_mean: Tensor

    @property
    def probe(self) -> Tensor:
        """Non-finite wherever a score was (0 * inf is NaN too): the optimizer's skip test."""
        return self.u_score_mean

    @classmethod
    def zeros_like(cls, t: Tensor) -> ScoreStats:
        return cls(*(torch.zeros_like(t) for _ in range(4)))


def score(
    grad: Tensor,
    theta: Tensor,
    prior_mean: Tensor | None,
    *,
    dataset_size: float,
    prior_precision: float,
    temperature: float,
) -> Tensor:
    """``s = -N * grad / T - prior_precision * (theta - prior_mean)`` (prior_mean None means 0)."""
    centred = theta if prior_mean is None else theta - prior_mean
    return grad.mul(-dataset_size / temperature).sub_(centred, alpha=prior_precision)


def accumulate_stats(stats: ScoreStats, u: Tensor, s: Tensor, weight: float) -> None:
    """Add one sample's contribution ``weight * (u, u^2, s, u s)`` to ``stats`` in place."""
    stats.u_mean.add_(u, alpha=weight)
    stats.u_sq_mean.addcmul_(u, u, value=weight)
    stats.score_mean.add_(s, alpha=weight)
    stats.u_score_mean.addcmul_(u, s, value=weight)


def _adam(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps):
    """Adam in place; ``exp_avg`` None means no first moment (beta1 = 0: the gradient itself)."""
    if exp_avg is None:
        exp_avg = grad
    else:
        exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - beta1**step
    bias2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias1)


def adam_step(mean, log_scale, grad_mean, grad_log_scale, mean_avg, mean_avg_sq, scale_avg,
              scale_avg_sq, step, *, lr, scale_lr, betas, eps, update_scale):
    """One Adam step on ``mean`` and (unless frozen) on the clamped ``log_scale``, single tensor."""
    beta1, beta2 = betas
    _adam(mean, grad_mean, mean_avg, mean_avg_sq, step, lr, beta1, beta2, eps)
    if update_scale:
        _adam(log_scale, grad_log_scale, scale_avg, scale_avg_sq, step, scale_lr, beta1, beta2, eps)
        log_scale.clamp_(LOG_SCALE_MIN, LOG_SCALE_MAX)


def proximal_gradients(mean, log_scale, mean_t, var_t, stats: ScoreStats, *, prox_weight,
                       mean_update):
    """Gradients of the proximal objective w.r.t. ``(mean, log_scale)`` (single tensor)."""
    var = torch.exp(2 * log_scale)
    delta = mean - mean_t
    d_mean = stats.u_mean - delta
    d_sq_mean = stats.u_sq_mean - 2 * delta * stats.u_mean + delta * delta
    ds_mean = stats.u_score_mean - delta * stats.score_mean
    weight = var_t / var
    if mean_update == "residual":
        grad_mean = 2 * weight * (-d_mean / var - stats.score_mean)
    else:
        grad_mean = -2 * stats.score_mean
    grad_log_scale = 4 * weight * (-d_sq_mean / var - ds_mean)
    # KL(q || q_t): zero at q = q_t, so it only acts from the second inner step on
    grad_mean = grad_mean + prox_weight * delta / var_t
    grad_log_scale = grad_log_scale + prox_weight * (var / var_t - 1)
    return grad_mean, grad_log_scale


def _gaussian_update_single(
    means, log_scales, stats, mean_avgs, mean_avg_sqs, scale_avgs, scale_avg_sqs, steps,
    *, lr, scale_lr, betas, eps, inner_steps, prox_weight, mean_update, update_scale,
):
    for i, (mean, log_scale, st) in enumerate(zip(means, log_scales, stats)):
        mean_t = mean.clone()
        var_t = torch.exp(2 * log_scale)
        for _ in range(inner_steps):
            steps[i] += 1
            step = float(steps[i])
            grad_mean, grad_log_scale = proximal_gradients(
                mean, log_scale, mean_t, var_t, st, prox_weight=prox_weight,
                mean_update=mean_update)
            adam_step(mean, log_scale, grad_mean, grad_log_scale,
                      None if mean_avgs is None else mean_avgs[i], mean_avg_sqs[i],
                      None if scale_avgs is None else scale_avgs[i], scale_avg_sqs[i], step, lr=lr, scale_lr=scale_lr,
                      betas=betas, eps=eps, update_scale=update_scale)


def foreach_adam(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps):
    """Multi-tensor Adam in place; ``exp_avgs`` None means no first moment (beta1 = 0)."""
    if exp_avgs is None:
        exp_avgs = grads
    else:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    bias1 = 1 - beta1**step
    bias2_sqrt = (1 - beta2**step) ** 0.5
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / bias1)


#: devices whose fused-path Adam steps use torch's fused kernel. CUDA has one too, but it has not
#: yet been checked on a GPU with this optimizer (tests/test_cuda.py has the check, ready to run)
FUSED_ADAM_DEVICES = ("cpu",)


def fused_adam(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps):
    """:func:`foreach_adam` as torch's fused Adam kernel where there is one.

    On the devices in ``FUSED_ADAM_DEVICES`` this is ``torch._fused_adam_``, the kernel behind
    ``Adam(fused=True)``: one pass over memory instead of seven. It equals :func:`foreach_adam`
    to rounding, not bit for bit, so only the fused path (:mod:`torch_proxvi._fused`) uses it; the
    general path keeps :func:`foreach_adam`, which agrees with the single-tensor reference.
    Elsewhere, and for sharded (DTensor), mixed-device or non-contiguous lists, it is
    :func:`foreach_adam`: the kernel walks each tensor's memory in order, so a transposed weight
    with a gradient laid out row by row would be paired element for wrong element.
    ``grads`` must be temporaries of the caller: without first moments they stand in for them.
    """
    device = params[0].device if params else None
    lists = (params, grads, exp_avg_sqs) + (() if exp_avgs is None else (exp_avgs,))
    if device is None or device.type not in FUSED_ADAM_DEVICES or not all(
            p.device == device and not is_dtensor(p) for p in params) or not all(
            t.is_contiguous() for ts in lists for t in ts):
        foreach_adam(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps)
        return
    first = grads if exp_avgs is None else exp_avgs          # beta1 = 0: the gradient itself
    steps = [torch.full((), float(step), dtype=torch.float32, device=device)] * len(params)
    torch._fused_adam_(params, grads, first, exp_avg_sqs, [], steps, lr=lr,
                       beta1=0.0 if exp_avgs is None else beta1, beta2=beta2, weight_decay=0.0, eps=eps,
                       amsgrad=False, maximize=False)


def _gaussian_update_foreach(
    means, log_scales, stats, mean_avgs, mean_avg_sqs, scale_avgs, scale_avg_sqs, steps,
    *, lr, scale_lr, betas, eps, inner_steps, prox_weight, mean_update, update_scale,
):
    # All tensors of one call share a step count: the optimizer groups them by it.
    beta1, beta2 = betas
    u_mean = [s.u_mean for s in stats]
    u_sq_mean = [s.u_sq_mean for s in stats]
    score_mean = [s.score_mean for s in stats]
    u_score_mean = [s.u_score_mean for s in stats]
    var_t = torch._foreach_exp(torch._foreach_mul(log_scales, 2.0))
    mean_t = [m.clone() for m in means] if inner_steps > 1 else means
    for inner in range(inner_steps):
        torch._foreach_add_(steps, 1)
        step = float(steps[0])
        if inner == 0:  # at q_t: delta = 0 and var = var_t, so the formulas simplify
            var = var_t
            d_mean, d_sq_mean, ds_mean = u_mean, u_sq_mean, u_score_mean
            weight = None
        else:
            var = torch._foreach_exp(torch._foreach_mul(log_scales, 2.0))
            delta = torch._foreach_sub(means, mean_t)
            d_mean = torch._foreach_sub(u_mean, delta)
            d_sq_mean = torch._foreach_mul(delta, delta)
            torch._foreach_addcmul_(d_sq_mean, delta, u_mean, value=-2.0)
            torch._foreach_add_(d_sq_mean, u_sq_mean)
            ds_mean = torch._foreach_mul(delta, score_mean)
            torch._foreach_neg_(ds_mean)
            torch._foreach_add_(ds_mean, u_score_mean)
            weight = torch._foreach_div(var_t, var)
        if mean_update == "residual":
            grad_mean = torch._foreach_div(d_mean, var)
            torch._foreach_add_(grad_mean, score_mean)
            torch._foreach_mul_(grad_mean, -2.0)
            if weight is not None:
                torch._foreach_mul_(grad_mean, weight)
        else:
            grad_mean = torch._foreach_mul(score_mean, -2.0)
        grad_log_scale = torch._foreach_div(d_sq_mean, var)
        torch._foreach_add_(grad_log_scale, ds_mean)
        torch._foreach_mul_(grad_log_scale, -4.0)
        if weight is not None:
            torch._foreach_mul_(grad_log_scale, weight)
        if inner > 0 and prox_weight != 0:
            torch._foreach_add_(grad_mean, torch._foreach_div(delta, var_t), alpha=prox_weight)
            ratio = torch._foreach_div(var, var_t)
            torch._foreach_add_(ratio, -1.0)
            torch._foreach_add_(grad_log_scale, ratio, alpha=prox_weight)
        foreach_adam(means, grad_mean, mean_avgs, mean_avg_sqs, step, lr, beta1, beta2, eps)
        if update_scale:
            foreach_adam(log_scales, grad_log_scale, scale_avgs, scale_avg_sqs, step,
                          scale_lr, beta1, beta2, eps)
            torch._foreach_clamp_min_(log_scales, LOG_SCALE_MIN)
            torch._foreach_clamp_max_(log_scales, LOG_SCALE_MAX)


def gaussian_update(
    means: list[Tensor],
    log_scales: list[Tensor],
    stats: list[ScoreStats],
    mean_avgs: list[Tensor],
    mean_avg_sqs: list[Tensor],
    scale_avgs: list[Tensor],
    scale_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    scale_lr: float,
    betas: tuple[float, float],
    eps: float,
    inner_steps: int,
    prox_weight: float,
    mean_update: str,
    update_scale: bool,
    foreach: bool = False,
) -> None:
    """Proximal score-matching step of ``(means, log_scales)`` in place (see module docstring).

    ``steps`` are the per-parameter Adam step counts (0-dim tensors), advanced by
    ``inner_steps``; with ``foreach=True`` all steps must be equal. ``mean_avgs`` and
    ``scale_avgs`` are None without first moments (beta1 = 0). ``update_scale=False`` freezes
    the log-scales (warm-up).
    """
    fn = _gaussian_update_foreach if foreach else _gaussian_update_single
    fn(
        means, log_scales, stats, mean_avgs, mean_avg_sqs, scale_avgs, scale_avg_sqs, steps,
        lr=lr, scale_lr=scale_lr, betas=betas, eps=eps, inner_steps=inner_steps,
        prox_weight=prox_weight, mean_update=mean_update, update_scale=update_scale,
    )


def elbo_gradients(mean, log_scale, stats: ScoreStats, prior_mean, *, prior_precision):
    r"""Reparameterised gradients of the negative ELBO (ADVI) at ``q_t``, single tensor.

    With :math:`\theta = m + \sigma\epsilon`, :math:`u = \sigma\epsilon` and the likelihood
    score :math:`s_\ell = \hat s + \lambda_0 (\theta - \mu_0)` (the stats hold the full score
    :math:`\hat s`, averaged about ``mean``), and the Gaussian prior's KL taken analytically:

    * ``d/d mean      = -<s_l>     + prior_precision * (mean - prior_mean)``
    * ``d/d log_scale = -<u s_l>   + prior_precision * sigma^2 - 1``
    """
    centred = mean if prior_mean is None else mean - prior_mean
    lik_score = stats.score_mean + prior_precision * (stats.u_mean + centred)
    lik_u_score = stats.u_score_mean + prior_precision * (stats.u_sq_mean + stats.u_mean * centred)
    grad_mean = -lik_score + prior_precision * centred
    grad_log_scale = -lik_u_score + prior_precision * torch.exp(2 * log_scale) - 1
    return grad_mean, grad_log_scale
