r"""The posterior score from ``p.grad``, and its Monte Carlo statistics about the iterate's mean.

With the mean loss of a mini-batch in ``p.grad``, the score estimate at the sample
:math:`\theta` is

.. math::
    \hat s(\theta) = -\frac{N}{T} \nabla L_B(\theta) - \lambda_0 (\theta - \mu_0)

(``StepHyper.score_scale`` is :math:`-N/T`). The Gaussian updates need it only through four
averages over the K samples, taken about the mean :math:`m_t` of the iterate they came from
(:class:`ScoreStats`): :math:`\langle u \rangle, \langle u^2 \rangle, \langle \hat s \rangle,
\langle u \hat s \rangle` with :math:`u = \theta - m_t`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["score", "ScoreStats", "one_sample", "accumulate"]


def score(grad: Tensor, theta: Tensor, prior_mean: Tensor | None, h) -> Tensor:
    """:math:`\\hat s`: ``grad * score_scale - prior_precision * (theta - prior_mean)`` (None: 0)."""
    centred = theta if prior_mean is None else theta - prior_mean
    return grad * h.score_scale - h.prior_precision * centred


class ScoreStats(NamedTuple):
    """Monte Carlo averages over the K samples of one step, for one tensor."""

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


def one_sample(u: Tensor, s: Tensor) -> ScoreStats:
    """The statistics of a single sample (K = 1)."""
    return ScoreStats(u, u * u, s, u * s)


def accumulate(stats: ScoreStats, u: Tensor, s: Tensor, weight: float) -> None:
    """Add one sample's ``weight * (u, u^2, s, u s)`` to ``stats`` in place."""
    stats.u_mean.add_(u, alpha=weight)
    stats.u_sq_mean.addcmul_(u, u, value=weight)
    stats.score_mean.add_(s, alpha=weight)
    stats.u_score_mean.addcmul_(u, s, value=weight)
