r"""The mean-field Gaussian's Adam-based updates, written once, for one tensor.

State per weight: ``mean`` :math:`m`, ``log_scale`` :math:`\rho` (:math:`\sigma = e^\rho`) and
Adam's moments of each (``*_exp_avg`` only when ``beta1 > 0``); ``prior_mean`` with
``prior_mean="init"``. Given the statistics of :mod:`.score`, a step takes ``inner_steps`` Adam
steps on :math:`(m, \rho)` along the gradients of one of two objectives (``StepHyper.rule``):

``"proximal"`` (ProxScoreOptimizer) — the proximal score-matching objective

.. math::
    \frac1K \sum_k \|\sigma_t (\nabla_\theta \log q(\theta_k) - \hat s_k)\|^2
      + \lambda_{prox} \mathrm{KL}(q \| q_t), \qquad \nabla_\theta \log q(\theta) = -(\theta - m)/\sigma^2.

With :math:`\delta = m - m_t`, :math:`d = u - \delta` and :math:`w = \sigma_t^2/\sigma^2`:

* :math:`\partial_m = 2w(-\langle d\rangle/\sigma^2 - \langle \hat s\rangle) + \lambda_{prox}\delta/\sigma_t^2`
  (``mean_update="residual"``), or :math:`-2\langle \hat s\rangle + \lambda_{prox}\delta/\sigma_t^2`
  (``"score"``: the control variate :math:`-\langle d\rangle/\sigma^2` dropped);
* :math:`\partial_\rho = 4w(-\langle d^2\rangle/\sigma^2 - \langle d\hat s\rangle)
  + \lambda_{prox}(\sigma^2/\sigma_t^2 - 1)`.

At the first inner step :math:`q = q_t` (:math:`\delta = 0, w = 1`) and the KL terms vanish.

``"elbo"`` (ADVI) — the reparameterised negative ELBO with the Gaussian prior's KL analytic,
:math:`s_\ell = \hat s + \lambda_0(\theta - \mu_0)` the likelihood score:

* :math:`\partial_m = -\langle s_\ell\rangle + \lambda_0 (m - \mu_0)`,
  :math:`\partial_\rho = -\langle u s_\ell\rangle + \lambda_0\sigma^2 - 1`.

Every path of :mod:`.dispatch` (per tensor, packed flat arrays, compiled) calls these functions;
the hyperparameters ``h`` are a :class:`~.hyper.StepHyper`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .adam import adam
from .score import ScoreStats

__all__ = ["STATE", "MEAN_UPDATES", "LOG_SCALE_MIN", "LOG_SCALE_MAX", "STD_RANGE", "init_state", "proximal_gradients",
           "elbo_gradients", "GRADIENTS", "update", "sample", "mean", "std"]

# exp(2 * log_scale) must stay a normal float32 number: std in [exp(-30), exp(20)].
LOG_SCALE_MIN = -30.0
LOG_SCALE_MAX = 20.0
#: the stds the state can hold: an initial std must lie in it
STD_RANGE = (math.exp(LOG_SCALE_MIN), math.exp(LOG_SCALE_MAX))
#: the ``mean_update`` values of these rules
MEAN_UPDATES = ("score", "residual")
#: the per-weight state tensors, in the order a packed call lays them out
STATE = ("mean", "log_scale", "mean_exp_avg", "mean_exp_avg_sq", "log_scale_exp_avg", "log_scale_exp_avg_sq",
         "prior_mean")


def init_state(state: dict, mean: Tensor, *, init_std: float, first_moments: bool) -> None:
    """The state of a weight tensor whose posterior starts at ``N(mean, init_std^2)``."""
    state["mean"] = mean
    state["log_scale"] = torch.full_like(mean, math.log(init_std))
    names = ("mean_exp_avg_sq", "log_scale_exp_avg_sq")
    if first_moments:
        names += ("mean_exp_avg", "log_scale_exp_avg")
    for name in names:
        state[name] = torch.zeros_like(mean)


def proximal_gradients(state: dict, stats: ScoreStats, var_t: Tensor, mean_t: Tensor | None, h):
    """Gradients of the proximal objective w.r.t. ``(mean, log_scale)``; ``mean_t`` None: at q_t."""
    u_mean, u_sq_mean, score_mean, u_score_mean = stats
    if mean_t is None:
        var, weight = var_t, 1.0
        d_mean, d_sq_mean, ds_mean = u_mean, u_sq_mean, u_score_mean
    else:
        var = torch.exp(2 * state["log_scale"])
        weight = var_t / var
        delta = state["mean"] - mean_t
        d_mean = u_mean - delta
        d_sq_mean = u_sq_mean - 2 * delta * u_mean + delta * delta
        ds_mean = u_score_mean - delta * score_mean
    if h.mean_update == "residual":
        grad_mean = 2 * weight * (-d_mean / var - score_mean)
    else:
        grad_mean = -2 * score_mean
    grad_log_scale = 4 * weight * (-d_sq_mean / var - ds_mean)
    if mean_t is not None:  # KL(q || q_t): zero at q = q_t
        grad_mean = grad_mean + h.prox_weight * delta / var_t
        grad_log_scale = grad_log_scale + h.prox_weight * (var / var_t - 1)
    return grad_mean, grad_log_scale


def elbo_gradients(state: dict, stats: ScoreStats, var_t: Tensor, mean_t: Tensor | None, h):
    """Reparameterised gradients of the negative ELBO (ADVI) at ``q_t``."""
    u_mean, u_sq_mean, score_mean, u_score_mean = stats
    prior_mean = state.get("prior_mean")
    centred = state["mean"] if prior_mean is None else state["mean"] - prior_mean
    lik_score = score_mean + h.prior_precision * (u_mean + centred)
    lik_u_score = u_score_mean + h.prior_precision * (u_sq_mean + u_mean * centred)
    grad_mean = -lik_score + h.prior_precision * centred
    grad_log_scale = -lik_u_score + h.prior_precision * var_t - 1
    return grad_mean, grad_log_scale


#: ``StepHyper.rule`` -> the gradients of its objective
GRADIENTS = {"proximal": proximal_gradients, "elbo": elbo_gradients}


def update(state: dict, stats: ScoreStats, h) -> None:
    """``h.inner_steps`` Adam steps of ``state`` in place (the step counter is the caller's)."""
    gradients = GRADIENTS[h.rule]
    mean, log_scale = state["mean"], state["log_scale"]
    var_t = torch.exp(2 * log_scale)
    mean_t = mean.clone() if h.inner_steps > 1 else None
    for inner in range(h.inner_steps):
        step = h.step + (inner + 1)
        grad_mean, grad_log_scale = gradients(state, stats, var_t, None if inner == 0 else mean_t, h)
        adam(mean, grad_mean, state.get("mean_exp_avg"), state["mean_exp_avg_sq"], lr=h.lr, step=step,
             beta1=h.beta1, beta2=h.beta2, eps=h.eps)
        if h.update_scale:
            adam(log_scale, grad_log_scale, state.get("log_scale_exp_avg"), state["log_scale_exp_avg_sq"],
                 lr=h.scale_lr, step=step, beta1=h.beta1, beta2=h.beta2, eps=h.eps)
            log_scale.clamp_(LOG_SCALE_MIN, LOG_SCALE_MAX)


def sample(state: dict, noise: Tensor) -> Tensor:
    r""":math:`m + \sigma \epsilon` for standard-normal ``noise`` :math:`\epsilon`."""
    return state["mean"] + torch.exp(state["log_scale"]) * noise


def mean(state: dict) -> Tensor:
    return state["mean"]


def std(state: dict) -> Tensor:
    return torch.exp(state["log_scale"])
