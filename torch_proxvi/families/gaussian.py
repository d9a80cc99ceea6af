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

The update is closed form (:func:`torch_proxvi._functional.gaussian_update`): the proximal
objective needs only four Monte Carlo averages per weight (:class:`~torch_proxvi._functional.ScoreStats`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _functional as F
from .._random import normal_
from .base import Family, register, state_dtype, sum_weights

__all__ = ["Gaussian", "init_state", "first_moments", "sample", "mean", "std", "state_dtype"]

_LOG_2PI = math.log(2 * math.pi)


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


def sample(state: dict, generator: torch.Generator | None, count: int | None = None) -> Tensor:
    r"""One draw :math:`m + \sigma \odot \epsilon`, :math:`\epsilon \sim N(0, I)` (or ``count``)."""
    m = state["mean"]
    if count is None:
        noise = normal_(torch.empty_like(m), generator)
    else:
        noise = torch.randn((count, *m.shape), generator=generator, device=m.device, dtype=m.dtype)
    return noise.mul_(state["log_scale"].exp()).add_(m)


def mean(state: dict) -> Tensor:
    return state["mean"]


def std(state: dict) -> Tensor:
    return state["log_scale"].exp()


class Gaussian(Family):
    r"""``family="gaussian"``: the mean-field Gaussian, updated in closed form.

    * :math:`\log q(\theta) = -\tfrac12 \sum (\theta - m)^2/\sigma^2 - \sum \log\sigma - \tfrac D2 \log 2\pi`
    * :math:`\nabla_\theta \log q = -(\theta - m)/\sigma^2`
    * :math:`\mathrm{KL}(q \,\|\, q') = \sum \log(\sigma'/\sigma) + (\sigma^2 + (m - m')^2)/(2\sigma'^2) - \tfrac12`
    """

    name = "gaussian"
    variational = ("mean", "log_scale")

    def init_state(self, state, p, group):
        init_state(state, p, init_std=group["init_std"], first_moments=group["betas"][0] > 0)

    def sample(self, group, params, states, generator, count=None, *, compiled=False):
        return [sample(st, generator, count) for st in states]

    def log_prob(self, group, states, thetas):
        total = 0.0
        for st, theta in zip(states, thetas):
            z = (theta - st["mean"]) / std(st)
            total = total + sum_weights(-0.5 * z * z - st["log_scale"] - 0.5 * _LOG_2PI, st["mean"])
        return torch.as_tensor(total)

    def score(self, group, states, thetas):
        return [(st["mean"] - theta) / torch.exp(2 * st["log_scale"]) for st, theta in zip(states, thetas)]

    def kl(self, group, states, others, generator=None):
        total = 0.0
        for st, ot in zip(states, others):
            var, var_o = torch.exp(2 * st["log_scale"]), torch.exp(2 * ot["log_scale"])
            delta = st["mean"] - ot["mean"]
            total = total + (ot["log_scale"] - st["log_scale"] + (var + delta * delta) / (2 * var_o) - 0.5).sum()
        return torch.as_tensor(total)

    def mean(self, group, params, states):
        return [mean(st) for st in states]

    def std(self, group, params, states):
        return [std(st) for st in states]

    def collect(self, group, state, theta, score, acc, weight):
        u = theta - state["mean"]
        if acc is None:
            if weight == 1.0:
                return F.ScoreStats(u, u * u, score, u * score)
            acc = F.ScoreStats.zeros_like(u)
        F.accumulate_stats(acc, u, score, weight)
        return acc

    def update(self, group, states, accs, *, foreach, generator, compiled=False):
        outer_steps = float(states[0]["step"]) // group["inner_steps"]
        F.gaussian_update(
            [s["mean"] for s in states], [s["log_scale"] for s in states], accs,
            first_moments(states, "mean_exp_avg", group["betas"][0]),
            [s["mean_exp_avg_sq"] for s in states],
            first_moments(states, "log_scale_exp_avg", group["betas"][0]),
            [s["log_scale_exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            lr=group["lr"], scale_lr=group["lr"] * group["scale_lr_ratio"],
            betas=group["betas"], eps=group["eps"], inner_steps=group["inner_steps"],
            prox_weight=group["prox_weight"], mean_update=group["mean_update"],
            update_scale=outer_steps >= group["warmup_steps"], foreach=foreach,
        )


GAUSSIAN = register(Gaussian())
