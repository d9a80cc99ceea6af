r"""``rule="solved"``: the Gaussian proximal step solved per weight, in float32, for every path.

The per-weight problem and its exact (float64, global) minimiser are in :mod:`.solved`; this is
the step the optimizer runs. The posterior is kept as in :mod:`.gaussian` (``mean``,
``log_scale``; the precision is :math:`P = e^{-2\rho}`), so sampling, ``posterior_std``,
checkpoints and sharding are the Gaussian family's. State per weight: ``mean``, ``log_scale``
and ``mean_exp_avg`` (plus ``mean_exp_avg_sq`` for ``mean_update="score"``).

**Precision.** The KL splits exactly into a mean part (weight :math:`\lambda_m`) and a scale part
(weight :math:`\lambda_s`). At :math:`\delta = 0` the scale part's stationarity is, for
:math:`p = P/P_t`, :math:`a = \langle u^2\rangle P_t`, :math:`b = \langle u(\hat s - g)\rangle`,

.. math::
    f(p) = 4ap^3 + 4bp^2 + \lambda_s(p - 1) = 0,

whose root near :math:`p = 1` is, to first order, :math:`p = (1-\rho) + \rho\hat H/P_t` with
Stein's curvature estimate :math:`\hat H = -b/\langle u^2\rangle` and
:math:`\rho = 4a/(4a + \lambda_s)`. The step sets :math:`\lambda_s = 4(1-\rho)/\rho` with
:math:`\rho` = ``scale_lr`` (``lr * scale_lr_ratio``, ``SCALE_LR_RATIO`` = 0.3 by default, clamped
to [0, ``RHO_MAX``]), so
:math:`\rho` is the fraction by which the precision moves toward the curvature estimate (for
:math:`a = 1`, its expectation), and it follows any learning-rate schedule: a decaying lr averages
the noisy estimates.

*Baseline.* :math:`g` is the averaged score of the earlier steps (``-mean_exp_avg``, debiased;
0 without it). It is independent of this step's draw, so :math:`E[u g] = 0` and :math:`b` keeps
its mean, but it removes the term :math:`u\,\hat s(m_t)` that dominates :math:`\langle u\hat s\rangle`
away from the mode (its variance grows as :math:`|\hat s(m_t)|^2/P_t`): without it the first
steps of a Bayesian linear regression from a poor start pushed single precisions up 100-fold,
where they froze their means.

*Root.* It lies in the bracket that :math:`f(0) = -\lambda_s < 0` and the sign of
:math:`f(1) = 4(a + b)` give: below 1, :math:`[\lambda_s/(\lambda_s + 4a + 4b^+), 1]`; above 1,
:math:`[1, -b/a]` (where :math:`f \ge \lambda_s(p-1) > 0`), capped at ``CAP`` times the linearised
root :math:`(\lambda_s - 4b)/(\lambda_s + 4a)` (for :math:`a \to 0`, where the problem has no
minimiser). The result is positive and finite for any input (the KL is a barrier at
:math:`P \to 0`; the unclamped linearised update is not positive). :math:`\rho` is clamped to
``RHO_MAX``: at :math:`\rho = 1` the barrier vanishes and a negative curvature estimate would
send the precision to 0.

Which root depends on the mean update:

* ``mean_update="score"`` (Adam) takes the **first-order root**, the linearised root clamped to
  the bracket, which is :math:`\max\big((\lambda_s - 4b)/(\lambda_s + 4a),\;
  \lambda_s/(\lambda_s + 4a + 4b^+)\big) = \big(\lambda_s - 4\min(b, 0)\big)/
  \big(\lambda_s + 4a + 4\max(b, 0)\big)`: the linearised root is below 1 exactly where
  the root is, above 1 it never passes :math:`-b/a`, and for :math:`b > 0` it is below the
  bracket's lower end. No iteration, one division. It is linear in the noisy
  :math:`b`, so mini-batch noise averages out: at the Gaussian fixed point with score noise three
  times the curvature, :math:`E[\log p]` is :math:`-0.05\rho` per step against :math:`+0.43\rho` for the exact root
  (tests/test_solved_step.py), whose convexity in :math:`b` pushed the precision of a logistic
  regression at batch 32 about 12 % high (docs/benchmarks.md).
* ``mean_update="newton"`` takes the **exact root**: ``NEWTON_ITERS`` = 2 safeguarded Newton
  steps from the linearised root find it to float32 precision for :math:`\rho \le 0.01` on
  moderate statistics (:math:`|b| \lesssim 10`); where the root is far (a noisy :math:`b` of
  tens, or :math:`\rho \ge 0.1`), the step stops inside the final bracket, between :math:`P_t`
  and the root: a shorter step, never a wrong-signed one. Its mean step is scaled by
  :math:`\sigma^2`, and with the first-order root it diverged on the BNN of the posterior-quality
  benchmark: the exact root's upward bias under noise keeps :math:`\sigma^2` from growing there.
  Where :math:`f` has three roots (a tight trust region and an estimate far above :math:`P_t`),
  the step takes the root its bracket converges to, the reference :func:`.solved.solve` the
  global minimiser.

**Mean.** The mean part's stationarity at the new precision,
:math:`\delta = 2p^2 (U + \sigma^2 C)/(2p^2 + \lambda_m)` (:math:`\sigma^2 = 1/P`,
:math:`U = \langle u\rangle`, :math:`C = \langle\hat s\rangle`), is a damped Newton step
preconditioned by the posterior variance. ``mean_update="newton"`` takes it with
:math:`\lambda_m = 2(1-\eta)/\eta`, :math:`\eta` = ``lr`` clamped to [0, 1] (the fraction of the
Newton step at :math:`p = 1`), with :math:`C` replaced by its average (``-mean_exp_avg``,
``betas[0]``, bias-corrected) and the control variate :math:`U` dropped (its noise cancels only
against the same draw's score, which the average no longer is: the ``"score"`` choice of the Adam
rule, for the same reason). ``mean_update="score"`` keeps Adam on the mean, :math:`-C` its
gradient (``lr`` has Adam's meaning).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .adam import adam
from .gaussian import LOG_SCALE_MAX, LOG_SCALE_MIN, mean, sample, std
from .score import ScoreStats

__all__ = ["STATE", "MEAN_UPDATES", "NEWTON_ITERS", "SCALE_LR_RATIO", "INIT_CURVATURE", "FINE_TUNE_CURVATURE",
           "fine_tune_curvature", "RHO_MAX", "CAP",
           "init_state", "precision_ratio", "update", "sample", "mean", "std"]

STATE = ("mean", "log_scale", "mean_exp_avg", "mean_exp_avg_sq", "prior_mean")
MEAN_UPDATES = ("score", "newton")
NEWTON_ITERS = 2
#: the rule's ``scale_lr_ratio`` when the group leaves it None: rho = 0.3 lr averages the noisy
#: curvature estimates over more steps than rho = lr (docs/benchmarks.md, "The solved proximal step")
SCALE_LR_RATIO = 0.3
#: the rule's ``init_curvature`` when the group leaves it None and trains from scratch: it always
#: starts from the data; h0 = 5 met the from-scratch target untuned, h0 = 1 did not
#: (docs/benchmarks.md, "The solved rule's default start")
INIT_CURVATURE = 5.0
#: a fine-tune's ``init_curvature`` (``prior_mean="init"``) when the group leaves it None, per weight
#: tensor the optimizer trains: the start that worked grew with their number L (h0 0.5-1 at L = 5,
#: 3.4 at 17, 5 at 28, 10-25 at 50), as when a fixed amount of noise is shared among the layers
#: (docs/benchmarks.md, "A fine-tune's default start")
FINE_TUNE_CURVATURE = 0.2
#: largest precision trust fraction: the KL's barrier keeps the precision positive
RHO_MAX = 0.5
#: the bracket above p = 1 ends at CAP times the linearised root (a trust region where a -> 0)
CAP = 64.0
#: smallest precision trust fraction: 4 / _RHO_MIN stays a finite float32 number
_RHO_MIN = 1e-30


def fine_tune_curvature(weight_tensors: int) -> float:
    """The rule's ``init_curvature`` for a fine-tune that trains ``weight_tensors`` tensors of two or
    more dimensions: ``FINE_TUNE_CURVATURE`` each, at least 1 (the widest default start measured)."""
    return max(1.0, FINE_TUNE_CURVATURE * weight_tensors)


def init_state(state: dict, mean_: Tensor, *, init_std: float, mean_update: str, first_moments: bool) -> None:
    """The state of a weight tensor whose posterior starts at ``N(mean_, init_std^2)``."""
    state["mean"] = mean_
    state["log_scale"] = torch.full_like(mean_, math.log(init_std))
    if mean_update == "score":
        state["mean_exp_avg_sq"] = torch.zeros_like(mean_)
    if first_moments:
        state["mean_exp_avg"] = torch.zeros_like(mean_)


def precision_ratio(a: Tensor, b: Tensor, rho, iterations: int = NEWTON_ITERS) -> Tensor:
    r"""The root :math:`p = P/P_t` of :math:`4ap^3 + 4bp^2 + \lambda_s(p-1)` in the trust bracket,
    :math:`\lambda_s = 4(1-\rho)/\rho` (module docstring). ``rho`` in [0, 1]: 0 keeps p = 1.
    ``iterations=0``: the first-order root :math:`(\lambda_s - 4b)/(\lambda_s + 4a)`, clamped
    to the bracket."""
    rho = torch.as_tensor(rho, dtype=a.dtype, device=a.device).clamp(_RHO_MIN, RHO_MAX)
    lam = 4 * (1 - rho) / rho
    a = a.clamp_min(0)
    if iterations == 0:
        # the linearised root clamped to the bracket is max(linear, floor) (docs/method.md section 9,
        # point 5), and that is one quotient: for b <= 0 the linearised root (lam - 4b)/(lam + 4a)
        # (floor = lam/(lam + 4a) is below it), for b > 0 the floor lam/(lam + 4a + 4b) (floor - linear
        # = 16b(a + b)/((lam + 4a)(lam + 4a + 4b)) > 0). (Where the two rounded quotients tie to an
        # ulp, their maximum can differ from this by that ulp.)
        p = (lam - 4 * b.clamp_max(0)) / (lam + 4 * a + 4 * b.clamp_min(0))
        return torch.where(torch.isfinite(p), p, 1.0)   # overflowing statistics: keep the precision
    linear = (lam - 4 * b) / (lam + 4 * a)
    floor = lam / (lam + 4 * a + 4 * b.clamp_min(0))   # the bracket's lower end below 1
    below = a + b > 0                                   # f(1) > 0: the root is in (0, 1)
    lo = torch.where(below, floor, 1.0)
    hi = torch.where(below, 1.0, torch.minimum(-b / a.clamp_min(torch.finfo(a.dtype).tiny), CAP * linear).clamp_min(1))
    p = linear.clamp(min=lo, max=hi)                    # the linearised root, in the bracket
    p = torch.where(torch.isfinite(p), p, 0.5 * (lo + hi))
    for _ in range(iterations):
        f = 4 * p * p * (a * p + b) + lam * (p - 1)
        lo = torch.where(f < 0, p, lo)
        hi = torch.where(f < 0, hi, p)
        df = 12 * a * p * p + 8 * b * p + lam
        newton = p - f / df
        inside = (newton >= lo) & (newton <= hi)
        p = torch.where(inside, newton, 0.5 * (lo + hi))
    return p


def _debiased(avg: Tensor, beta1, step):
    """Adam's bias correction of an average after ``step`` updates (0 before the first)."""
    return avg * (1 / (1 - beta1**step + (step == 0)))   # a scalar reciprocal: no division per weight


def update(state: dict, stats: ScoreStats, h) -> None:
    r"""One solved step of ``state`` in place (``inner_steps`` does not apply: the step is exact).

    ``mean_exp_avg`` is the average of the gradient :math:`-\hat s` for both mean updates (Adam's
    first moment for ``"score"``): debiased, it is the baseline :math:`-g` of the precision's
    estimate and the Newton mean's direction."""
    u_mean, u_sq_mean, score_mean, u_score_mean = stats
    mean_, log_scale = state["mean"], state["log_scale"]
    avg = state.get("mean_exp_avg")
    p = 1.0
    if h.update_scale:
        u_score = u_score_mean                          # b = <u (s - g)>: E[u] = 0, so b keeps its mean
        if avg is not None:
            u_score = u_score + u_mean * _debiased(avg, h.beta1, h.step)
        iterations = NEWTON_ITERS if h.mean_update == "newton" else 0
        p = precision_ratio(u_sq_mean * torch.exp(-2 * log_scale), u_score, h.scale_lr, iterations)
        log_scale.sub_(0.5 * torch.log(p)).clamp_(LOG_SCALE_MIN, LOG_SCALE_MAX)
    step = h.step + 1
    if h.mean_update != "newton":
        adam(mean_, -score_mean, avg, state["mean_exp_avg_sq"], lr=h.lr, step=step, beta1=h.beta1,
             beta2=h.beta2, eps=h.eps)
        return
    gradient = -score_mean if avg is None else _debiased(avg.lerp_(-score_mean, 1 - h.beta1), h.beta1, step)
    eta = torch.as_tensor(h.lr, dtype=mean_.dtype, device=mean_.device).clamp(0.0, 1.0)
    p2 = p * p
    mean_.sub_(p2 * eta / (p2 * eta + (1 - eta)) * torch.exp(2 * log_scale) * gradient)
