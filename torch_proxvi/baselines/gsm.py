r"""GSM: Gaussian score matching VI (Modi et al., 2023), as a torch.optim optimizer.

For each sample :math:`z \sim q_t` with score :math:`g = \nabla \log p(z)`, GSM moves to the
Gaussian closest to :math:`q_t` in KL whose own score matches at that point,
:math:`\nabla \log q(z) = g`. With :math:`\Sigma = \Sigma_t`, :math:`\mu = \mu_t`,
:math:`a = (\mu - z)^\top g` and :math:`\rho = \tfrac12\sqrt{1 + 4(g^\top\Sigma g + a^2)} - \tfrac12`:

.. math::
    \epsilon = \Sigma g - \mu + z, \qquad
    \Delta\mu = \frac{1}{1+\rho}\Big(I - \frac{(\mu - z) g^\top}{1 + \rho + a}\Big)\epsilon,

    \Delta\Sigma = (\mu - z)(\mu - z)^\top - (\mu + \Delta\mu - z)(\mu + \Delta\mu - z)^\top.

A batch of K samples averages the K updates. ``lr`` in [0, 1] damps the step,
:math:`\mu \leftarrow \mu + \eta\,\overline{\Delta\mu}`, :math:`\Sigma \leftarrow \Sigma +
\eta\,\overline{\Delta\Sigma}` (a convex combination of positive definite matrices, so it stays
positive definite); ``lr=1`` is the published algorithm. The diagonal version applies the 1-D
update to each coordinate, where it reduces to :math:`\Delta\mu = \epsilon / (1 + \rho + a)`.

Example:
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = GSM(model.parameters(), dataset_size=50, covariance="dense", mc_samples=4)
    >>> x, y = torch.randn(50, 3), torch.randn(50, 1)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = torch.nn.functional.mse_loss(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)

Reference: Modi, Margossian, Yao, Gower, Blei, Saul, "Variational Inference with Gaussian Score
Matching", NeurIPS 2023 (arXiv:2307.07849).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import _check
from ..families import register
from ._batch_gaussian import BatchGaussian, BatchGaussianVI

__all__ = ["GSM", "gsm_diagonal_update", "gsm_dense_update"]


def gsm_diagonal_update(mean: Tensor, var: Tensor, theta: Tensor, score: Tensor,
                        lr: float = 1.0) -> tuple[Tensor, Tensor]:
    """GSM on every coordinate separately; ``theta``, ``score``: [K, *mean.shape]."""
    offset = mean - theta                       # mu - z
    a = offset * score
    rho = 0.5 * torch.sqrt(1 + 4 * (var * score * score + a * a)) - 0.5
    eps = var * score - offset
    mean_shift = eps / (1 + rho + a)
    var_shift = offset * offset - (offset + mean_shift) ** 2
    return mean + lr * mean_shift.mean(0), var + lr * var_shift.mean(0)


def gsm_dense_update(mean: Tensor, cov: Tensor, theta: Tensor, score: Tensor,
                     lr: float = 1.0) -> tuple[Tensor, Tensor]:
    """GSM with a full covariance; ``mean`` [D], ``cov`` [D, D], ``theta``, ``score`` [K, D]."""
    offset = mean - theta                                   # [K, D], mu - z
    cov_g = score @ cov                                     # [K, D], Sigma g (Sigma symmetric)
    a = (offset * score).sum(1, keepdim=True)               # [K, 1]
    g_cov_g = (cov_g * score).sum(1, keepdim=True)
    rho = 0.5 * torch.sqrt(1 + 4 * (g_cov_g + a * a)) - 0.5
    eps = cov_g - offset
    g_eps = (score * eps).sum(1, keepdim=True)
    mean_shift = (eps - offset * g_eps / (1 + rho + a)) / (1 + rho)
    new_offset = offset + mean_shift
    cov_shift = offset.T @ offset - new_offset.T @ new_offset
    k = theta.shape[0]
    return mean + lr * mean_shift.mean(0), cov + (lr / k) * cov_shift


class GSMFamily(BatchGaussian):
    """``family="gsm"``: the Gaussian of :class:`GSM` (its group key ``covariance``)."""

    name = "gsm"
    owner = "GSM"

    def validate_lr(self, lr):
        _check(lr <= 1, "learning rate", lr, "GSM's lr damps its closed-form step: in [0, 1]")

    def diagonal_update(self, mean, var, theta, score, lr):
        return gsm_diagonal_update(mean, var, theta, score, lr)

    def dense_update(self, mean, cov, theta, score, lr):
        return gsm_dense_update(mean, cov, theta, score, lr)


register(GSMFamily())


class GSM(BatchGaussianVI):
    """Gaussian score matching with the ProxScoreOptimizer contract (see the module docstring).

    Args: as :class:`~torch_proxvi.ProxScoreOptimizer`, plus ``covariance`` (``"diagonal"`` or
    ``"dense"``, a group key). ``lr`` in [0, 1] damps the closed-form update (1: as published).
    ``init_std`` sets the initial (isotropic) standard deviation.
    """

    family_name = "gsm"
