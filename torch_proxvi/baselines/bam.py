r"""BaM: batch-and-match VI (Cai et al., 2024), as a torch.optim optimizer.

Each step draws a batch :math:`z_1..z_K \sim q_t` with scores :math:`g_k = \nabla\log p(z_k)`
and moves to the minimiser of a score-based divergence plus :math:`\tfrac{2}{\lambda}
\mathrm{KL}(q_t \| q)`, in closed form. With the batch means :math:`\bar z, \bar g`, covariances
:math:`C = \langle (z-\bar z)(z-\bar z)^\top\rangle`, :math:`\Gamma = \langle (g-\bar g)(g-\bar
g)^\top\rangle` and the learning rate :math:`\lambda` (``lr``):

.. math::
    U = \lambda\Gamma + \tfrac{\lambda}{1+\lambda}\bar g\bar g^\top, \qquad
    V = \Sigma_t + \lambda C + \tfrac{\lambda}{1+\lambda}(\mu_t - \bar z)(\mu_t - \bar z)^\top,

    \Sigma_{t+1} = 2V\big(I + (I + 4UV)^{1/2}\big)^{-1}, \qquad
    \mu_{t+1} = \tfrac{1}{1+\lambda}\mu_t + \tfrac{\lambda}{1+\lambda}(\Sigma_{t+1}\bar g + \bar z).

:math:`\Sigma_{t+1}` is the positive definite solution of :math:`\Sigma U \Sigma + \Sigma = V`,
computed as :math:`V^{1/2} \, 2(I + (I + 4V^{1/2}UV^{1/2})^{1/2})^{-1} V^{1/2}` with symmetric
eigen-decompositions. The diagonal version solves the same problem for a diagonal Gaussian,
where it separates into one scalar equation per coordinate. The paper decays
:math:`\lambda_t = BD/(t+1)` on non-Gaussian targets: use a ``LambdaLR`` scheduler.

Reference: Cai, Modi, Pillaud-Vivien, Margossian, Gower, Blei, Saul, "Batch and match:
black-box variational inference with a score-based divergence", ICML 2024 (arXiv:2402.14758).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..families import register
from ._batch_gaussian import BatchGaussian, BatchGaussianVI, symmetric_sqrt

__all__ = ["BaM", "bam_diagonal_update", "bam_dense_update"]


def bam_diagonal_update(mean: Tensor, var: Tensor, theta: Tensor, score: Tensor,
                        lr: float = 1.0) -> tuple[Tensor, Tensor]:
    """BaM for a diagonal Gaussian; ``theta``, ``score``: [K, *mean.shape]."""
    z_bar, g_bar = theta.mean(0), score.mean(0)
    c = theta.var(0, unbiased=False) if theta.shape[0] > 1 else torch.zeros_like(mean)
    gamma = score.var(0, unbiased=False) if score.shape[0] > 1 else torch.zeros_like(mean)
    shrink = lr / (1 + lr)
    u = lr * gamma + shrink * g_bar * g_bar
    v = var + lr * c + shrink * (mean - z_bar) ** 2
    new_var = 2 * v / (1 + torch.sqrt(1 + 4 * u * v))
    new_mean = mean / (1 + lr) + shrink * (new_var * g_bar + z_bar)
    return new_mean, new_var


def bam_dense_update(mean: Tensor, cov: Tensor, theta: Tensor, score: Tensor,
                     lr: float = 1.0) -> tuple[Tensor, Tensor]:
    """BaM with a full covariance; ``mean`` [D], ``cov`` [D, D], ``theta``, ``score`` [K, D]."""
    k = theta.shape[0]
    z_bar, g_bar = theta.mean(0), score.mean(0)
    z_c, g_c = theta - z_bar, score - g_bar
    shrink = lr / (1 + lr)
    u = lr * (g_c.T @ g_c) / k + shrink * torch.outer(g_bar, g_bar)
    d = mean - z_bar
    v = cov + lr * (z_c.T @ z_c) / k + shrink * torch.outer(d, d)
    v_half = symmetric_sqrt(0.5 * (v + v.T))
    m = v_half @ u @ v_half
    values, vectors = torch.linalg.eigh(0.5 * (m + m.T))
    inner = (vectors * (2 / (1 + torch.sqrt(1 + 4 * values.clamp_min(0))))) @ vectors.T
    new_cov = v_half @ inner @ v_half
    new_mean = mean / (1 + lr) + shrink * (new_cov @ g_bar + z_bar)
    return new_mean, new_cov


class BaMFamily(BatchGaussian):
    """``family="bam"``: the Gaussian of :class:`BaM` (its group key ``covariance``)."""

    name = "bam"
    owner = "BaM"

    def diagonal_update(self, mean, var, theta, score, lr):
        return bam_diagonal_update(mean, var, theta, score, lr)

    def dense_update(self, mean, cov, theta, score, lr):
        return bam_dense_update(mean, cov, theta, score, lr)


register(BaMFamily())


class BaM(BatchGaussianVI):
    """Batch-and-match VI with the ProxScoreOptimizer contract (see the module docstring).

    Args: as :class:`~torch_proxvi.ProxScoreOptimizer`, plus ``covariance`` (``"diagonal"`` or
    ``"dense"``, a group key). ``lr`` is BaM's :math:`\\lambda` (>= 0; larger moves further, 0 stands still);
    ``mc_samples`` is its batch size B.
    """

    family_name = "bam"
