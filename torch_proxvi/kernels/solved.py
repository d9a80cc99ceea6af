r"""The Gaussian proximal score-matching step, solved exactly per weight (not wired in yet).

Per weight, :math:`q = N(m, 1/P)`, :math:`q_t = N(m_t, 1/P_t)`, :math:`\sigma_t^2 = 1/P_t`,
:math:`u = \theta - m_t`, :math:`\delta = m - m_t` and the :class:`.ScoreStats` averages
:math:`U, A, C, B = \langle u\rangle, \langle u^2\rangle, \langle\hat s\rangle, \langle u\hat s\rangle`.
Since :math:`\nabla\log q = -P(u - \delta)` and the Gaussian KL splits exactly,
:math:`\mathrm{KL}(q\|q_t) = \tfrac12 P_t\delta^2 + \tfrac12(P_t/P - 1 - \log(P_t/P))`, the step minimises

.. math::
    F = \sigma_t^2\langle(P(u-\delta) + \hat s)^2\rangle + \lambda_m \tfrac{P_t\delta^2}{2}
        + \tfrac{\lambda_s}{2}\big(\tfrac{P_t}{P} - 1 - \log\tfrac{P_t}{P}\big).

Dimensionless: :math:`p = P/P_t`, :math:`x = \delta/\sigma_t`, :math:`\bar u = U/\sigma_t`,
:math:`c = \sigma_t C`, :math:`a = A/\sigma_t^2`, :math:`b = B`, :math:`v = a - \bar u^2 \ge 0`,
:math:`w = b - \bar u c`, :math:`\mu = \lambda_m/2`. Then, up to a constant,

.. math::
    F = v p^2 + 2 w p + (p(x - \bar u) - c)^2 + \mu x^2 + \tfrac{\lambda_s}{2}(1/p - 1 + \log p).

* :math:`\partial_x F = 0` (a convex quadratic in x): :math:`x = p(p\bar u + c)/(p^2 + \mu)`, i.e.
  :math:`\delta = 2\sigma_t^2 P(PU + C)/(2\sigma_t^2P^2 + \lambda_m P_t)`; at :math:`P = P_t`,
  :math:`\delta = \frac{2}{2+\lambda_m}(U + \sigma_t^2 C)`.
* Substituting leaves the profile :math:`G(p) = vp^2 + 2wp + \mu(p\bar u + c)^2/(p^2+\mu) + \tfrac{\lambda_s}{2}
  (1/p - 1 + \log p)`; :math:`G'(p) = 0` times :math:`p^2(p^2+\mu)^2` is a degree-7 polynomial (degree 5 for
  K = 1, where v = w = 0; the cubic :math:`4ap^3 + 4bp^2 + \lambda_s p - \lambda_s` as
  :math:`\lambda_m \to \infty`, whose linearisation at p = 1 is :math:`p = (1-\rho) + \rho\hat H`,
  :math:`\hat H = -b/a`, :math:`\rho = 4a/(4a + \lambda_s)`).
* For :math:`\lambda_s > 0` every minimiser is positive and finite: :math:`G \to +\infty` as
  :math:`p \to 0` (the KL barrier :math:`\lambda_s/(2p)`) and as :math:`p \to \infty` (:math:`vp^2` or
  :math:`\tfrac{\lambda_s}{2}\log p`; the mean term is bounded by :math:`\mu\bar u^2 + c^2`).
* The minimiser is **not always unique**: :math:`(1/p + \log p)'' < 0` for :math:`p > 2`, and a
  strong trust region (:math:`\lambda_s > 108 v`) with a curvature estimate far above :math:`P_t` gives
  two local minima (p near 1 and p near :math:`\hat H`), three have been seen with the mean term. G is
  convex when :math:`\mu = 0` and :math:`\lambda_s \le 108 v`.

The solver returns the global minimiser: every minimiser satisfies :math:`\mathrm{KL}_s(p) \le \Delta =
G(1) - \inf(vp^2 + 2wp)`, which bounds :math:`t = \log p` to :math:`[-\log(2(k+1)), k+1]`,
:math:`k = 2\Delta/\lambda_s` (capped at :math:`\pm` ``T_CAP``); a grid of ``grid`` points (256) in t locates the
local minima, the ``candidates`` lowest are refined by ``iters`` bisections on the sign of
:math:`dG/dt` in their two cells (60 halve a cell of width <= 4 T_CAP/(grid-1) below float64
resolution), and the lowest G wins. Works in float64 internally, returns the input dtype.
Non-finite input gives NaN in both outputs (the optimizer's skip guard catches it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .score import ScoreStats

__all__ = ["solve", "profile", "T_CAP"]

#: bound on |log(P/P_t)| (e^200 ~ 7e86): keeps every term finite in float64
T_CAP = 200.0


def profile(t: Tensor, v, w, ub, c, mu, lam) -> tuple[Tensor, Tensor]:
    """G(e^t) and dG/dt (dimensionless, constants dropped) elementwise."""
    p = torch.exp(t)
    den = p * p + mu
    x = p * (p * ub + c) / den
    g = v * p * p + 2 * w * p + mu * (p * ub + c) ** 2 / den + 0.5 * lam * (torch.exp(-t) - 1 + t)
    dg = 2 * v * p * p + 2 * w * p + 2 * mu * x * (ub * mu - c * p) / den + 0.5 * lam * (1 - torch.exp(-t))
    return g, dg


def solve(stats: ScoreStats, mean_t: Tensor, precision_t: Tensor, mean_weight, scale_weight, *,
          grid: int = 256, candidates: int = 3, iters: int = 60) -> tuple[Tensor, Tensor]:
    r"""The exact minimiser ``(mean, precision)`` of the proximal objective (module docstring).

    ``mean_weight`` :math:`\lambda_m \ge 0` and ``scale_weight`` :math:`\lambda_s > 0` are floats or
    tensors broadcastable to ``mean_t``.
    """
    dtype, f64 = mean_t.dtype, torch.float64

    def as64(z):
        return torch.as_tensor(z, dtype=f64, device=mean_t.device)

    U, A, C, B = (as64(s) for s in stats)
    m_t, P_t = as64(mean_t), as64(precision_t)
    mu, lam = as64(mean_weight) / 2, as64(scale_weight)
    sd = torch.rsqrt(P_t)
    ub, c = U / sd, C * sd
    v = ((A - U * U) * P_t).clamp_min(0)  # exactly 0 for K = 1, as is w
    w = torch.where(v > 0, B - U * C, 0.0)  # Cauchy-Schwarz: w = 0 when v = 0
    shape = torch.broadcast_shapes(v.shape, w.shape, ub.shape, c.shape, mu.shape, lam.shape, m_t.shape)
    v, w, ub, c, mu, lam = (z.expand(shape).unsqueeze(-1) for z in (v, w, ub, c, mu, lam))
    # the bracket: KL_s(p*) <= G(1) - inf(v p^2 + 2 w p)
    g1 = profile(torch.zeros_like(v), v, w, ub, c, mu, lam)[0]
    wneg = w.clamp_max(0)
    inf_d = torch.where(v > 0, -wneg * wneg / v, torch.where(wneg < 0, -torch.inf, 0.0))
    delta = (g1 - inf_d).clamp_min(0)
    k = torch.where(delta > 0, 2 * delta / lam, 0.0)
    t_hi = (k + 1).clamp_max(T_CAP)
    t_lo = (-torch.log(2 * (k + 1))).clamp_min(-T_CAP)
    frac = torch.linspace(0, 1, grid, dtype=f64, device=v.device)
    ts = t_lo + (t_hi - t_lo) * frac
    gs = profile(ts, v, w, ub, c, mu, lam)[0].nan_to_num(nan=torch.inf)
    pad = torch.full_like(gs[..., :1], torch.inf)
    left, right = torch.cat([pad, gs[..., :-1]], -1), torch.cat([gs[..., 1:], pad], -1)
    local = torch.where((gs <= left) & (gs <= right), gs, torch.inf)
    idx = torch.topk(local, min(candidates, grid), dim=-1, largest=False).indices
    step = (t_hi - t_lo) / (grid - 1)
    lo = torch.maximum(torch.gather(ts, -1, idx) - step, t_lo)
    hi = torch.minimum(torch.gather(ts, -1, idx) + step, t_hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        up = profile(mid, v, w, ub, c, mu, lam)[1] > 0  # NaN counts as "not rising"
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    t = 0.5 * (lo + hi)
    gt = profile(t, v, w, ub, c, mu, lam)[0].nan_to_num(nan=torch.inf)
    t = torch.gather(t, -1, gt.argmin(-1, keepdim=True)).squeeze(-1)
    v, w, ub, c, mu, lam = (z.squeeze(-1) for z in (v, w, ub, c, mu, lam))
    p = torch.exp(t)
    x = p * (p * ub + c) / (p * p + mu)
    mean, precision = m_t + x * sd, p * P_t
    finite = torch.ones_like(mean, dtype=torch.bool)
    for z in (U, A, C, B, m_t, P_t, mu, lam):
        finite = finite & torch.isfinite(z)
    mean, precision = (torch.where(finite, z, torch.nan) for z in (mean, precision))
    return mean.to(dtype), precision.to(dtype)
