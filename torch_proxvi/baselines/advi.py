r"""ADVI: mean-field Gaussian VI by the reparameterised ELBO gradient, as a torch.optim optimizer.

Same constructor, ``step``, sampling contexts, ``predictive``, ``posterior_mean/std`` and
``state_dict`` as :class:`~torch_proxvi.ProxScoreOptimizer` (it is one, with a different update):
each step takes Adam steps on :math:`(m, \log\sigma)` along

.. math::
    \nabla_m = -\langle s_\ell \rangle + \lambda_0 (m - \mu_0), \qquad
    \nabla_{\log\sigma} = -\langle s_\ell\, \sigma\epsilon \rangle + \lambda_0 \sigma^2 - 1

where :math:`s_\ell = -N \nabla L_B / T` is the likelihood score at the sample
:math:`\theta = m + \sigma\epsilon` and the Gaussian prior's KL is analytic. ``inner_steps``,
``prox_weight`` and ``mean_update`` do not apply and are fixed. It runs on every path of
:mod:`torch_proxvi.kernels.dispatch` (compiled by default, like ProxScoreOptimizer).

Reference: Kucukelbir et al., "Automatic Differentiation Variational Inference", JMLR 2017.
"""

from __future__ import annotations

import torch

from .._validation import _REQUIRED
from ..optimizer import ProxScoreOptimizer

__all__ = ["ADVI"]


class ADVI(ProxScoreOptimizer):
    """Mean-field ADVI with the ProxScoreOptimizer contract: the Gaussian family with
    ``rule="elbo"`` (see the module docstring; the gradients are
    :func:`torch_proxvi.kernels.gaussian.elbo_gradients`)."""

    def __init__(self, params, lr: float = 1e-3, *, dataset_size: float = _REQUIRED,
                 prior_precision: float = 1.0, prior_mean: str = "zero", init_std: float = 1e-3,
                 mc_samples: int = 1, betas=(0.9, 0.999), eps: float = 1e-8, temperature: float = 1.0,
                 scale_lr_ratio: float = 1.0, warmup_steps: int = 0, generator: torch.Generator | None = None,
                 foreach: bool | None = None, compiled: bool | None = None):
        super().__init__(params, lr, dataset_size=dataset_size, prior_precision=prior_precision,
                         prior_mean=prior_mean, family="gaussian", rule="elbo", init_std=init_std,
                         mc_samples=mc_samples, inner_steps=1, prox_weight=0.0, betas=betas, eps=eps,
                         temperature=temperature, mean_update="score", scale_lr_ratio=scale_lr_ratio,
                         warmup_steps=warmup_steps, generator=generator, foreach=foreach, compiled=compiled)
