r"""Mean-field Gaussian family :math:`q(\theta) = N(m, \mathrm{diag}\,\sigma^2)`, :math:`\sigma = e^\rho`.

Per parameter the optimizer's ``state`` holds plain tensors, float32 (float64 for float64
parameters) whatever the weights' dtype:

``mean``, ``log_scale``
    the variational parameters :math:`m` and :math:`\rho`;
``mean_exp_avg``, ``mean_exp_avg_sq``, ``log_scale_exp_avg``, ``log_scale_exp_avg_sq``
    Adam's moments for the proximal inner problem (the two ``*_exp_avg`` only when
    ``betas[0] > 0``);
``step``
    Adam's step count (a CPU scalar tensor, as in ``torch.optim.Adam``);
``prior_mean``
    only with ``prior_mean="init"``: the weights when the parameter group was added (set by the
    optimizer at construction, before any other state).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["init_state", "first_moments", "sample", "mean", "std", "state_dtype"]


def state_dtype(p: Tensor) -> torch.dtype:
    """float64 for float64 weights, float32 for everything else (bf16/fp16 included)."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def init_state(state: dict, p: Tensor, *, init_std: float, first_moments: bool = True) -> None:
    """Fill ``state`` for parameter ``p``: mean at the current weights, std ``init_std``.

    Without ``first_moments`` (Adam's beta1 = 0) the two ``*_exp_avg`` tensors are not stored:
    four state tensors per weight instead of six.
    """
    m = p.detach().to(state_dtype(p), copy=True)
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    state["mean"] = m
    state["log_scale"] = torch.full_like(m, math.log(init_std))
    names = ("mean_exp_avg_sq", "log_scale_exp_avg_sq")
    if first_moments:
        names += ("mean_exp_avg", "log_scale_exp_avg")
    for name in names:
        state[name] = torch.zeros_like(m)


def first_moments(states: list[dict], name: str, beta1: float) -> list[Tensor] | None:
    """Adam's first moments ``name`` of ``states`` (created if beta1 was 0 before), or None."""
    if beta1 == 0:
        return None
    for st in states:
        if name not in st:
            st[name] = torch.zeros_like(st["mean"])
    return [st[name] for st in states]


def sample(state: dict, generator: torch.Generator | None) -> Tensor:
    r"""One draw :math:`m + \sigma \odot \epsilon`, :math:`\epsilon \sim N(0, I)`."""
    m = state["mean"]
    noise = torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
    return noise.mul_(state["log_scale"].exp()).add_(m)


def mean(state: dict) -> Tensor:
    return state["mean"]


def std(state: dict) -> Tensor:
    return state["log_scale"].exp()
