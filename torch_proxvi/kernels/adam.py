r"""Adam, the one implementation every Adam-based update calls.

.. math::
    m \leftarrow \beta_1 m + (1 - \beta_1) g, \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \qquad
    \theta \leftarrow \theta - \frac{\eta}{1 - \beta_1^t} \frac{m}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}

Written with arithmetic operators only, so that the hyperparameters may be Python numbers (eager)
or 0-dim tensors (inside a compiled kernel, where a new step count must not recompile).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["adam"]


def adam(param: Tensor, grad: Tensor, exp_avg: Tensor | None, exp_avg_sq: Tensor, *, lr, step, beta1, beta2,
         eps) -> None:
    """One Adam step of ``param`` in place (step ``step`` counted from 1). ``exp_avg`` None keeps no
    first moment (beta1 = 0: the gradient itself)."""
    if exp_avg is None:
        first = grad
    else:
        exp_avg.mul_(beta1).add_(grad * (1 - beta1))
        first = exp_avg
    exp_avg_sq.mul_(beta2).add_(grad * grad * (1 - beta2))
    bias2_sqrt = (1 - beta2**step) ** 0.5
    param.sub_(lr / (1 - beta1**step) * first / (exp_avg_sq.sqrt() / bias2_sqrt + eps))
