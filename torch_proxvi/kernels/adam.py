r"""Adam, the one implementation every Adam-based update calls.

.. math::
    m \leftarrow \beta_1 m + (1 - \beta_1) g, \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \qquad
    \theta \leftarrow \theta - \frac{\eta}{1 - \beta_1^t} \frac{m}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}

Written with arithmetic operators only, so that the hyperparameters may be Python numbers (eager)
or 0-dim tensors (inside a compiled kernel, where a new step count must not recompile).

The gradient is first clamped to :math:`\pm\sqrt{\max}/2` of its dtype (:func:`grad_limit`;
9.2e18 in float32) and a NaN in it taken as 0: then :math:`g^2` and both moments stay finite
whatever comes (an overflowing product of finite numbers in a family's gradient, an ``inf - inf``
inside a flow's score at extreme parameters), the variable is not frozen by an infinite
:math:`v`, and a NaN moves nothing instead of spreading into the state. Finite gradients below the
bound are unchanged (the optimizer skips a step whose score alone is that large, and one whose
gradients are not finite: ``_validation.score_limit``, ``skip_cause``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adam", "grad_limit"]


def grad_limit(dtype: torch.dtype) -> float:
    """The largest |gradient| Adam takes in ``dtype``: its square, a quarter of the largest number."""
    return math.sqrt(torch.finfo(dtype).max) / 2


def adam(param: Tensor, grad: Tensor, exp_avg: Tensor | None, exp_avg_sq: Tensor, *, lr, step, beta1, beta2,
         eps) -> None:
    """One Adam step of ``param`` in place (step ``step`` counted from 1). ``exp_avg`` None keeps no
    first moment (beta1 = 0: the gradient itself)."""
    limit = grad_limit(exp_avg_sq.dtype)
    if torch.compiler.is_compiling():
        # the same values; (g == g) is False only at a NaN, and Inductor vectorises it where
        # isnan / nan_to_num made the compiled CPU kernel three times slower
        grad = torch.where(grad == grad, grad.clamp(-limit, limit), 0.0)
    else:
        grad = grad.clamp(-limit, limit).nan_to_num_(0.0)
    if exp_avg is None:
        first = grad
    else:
        exp_avg.mul_(beta1).add_(grad * (1 - beta1))
        first = exp_avg
    exp_avg_sq.mul_(beta2).add_(grad * grad * (1 - beta2))
    bias2_sqrt = (1 - beta2**step) ** 0.5
    param.sub_(lr / (1 - beta1**step) * first / (exp_avg_sq.sqrt() / bias2_sqrt + eps))
