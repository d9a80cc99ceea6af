r"""Mean-field Gaussian family :math:`q(\theta) = N(m, \mathrm{diag}\,\sigma^2)`, :math:`\sigma = e^\rho`.

Per parameter the optimizer's ``state`` holds plain tensors, float32 (float64 for float64
parameters) whatever the weights' dtype:

``mean``, ``log_scale``
    the variational parameters :math:`m` and :math:`\rho`;
``mean_exp_avg``, ``mean_exp_avg_sq``, ``log_scale_exp_avg``, ``log_scale_exp_avg_sq``
    Adam's moments (the two ``*_exp_avg`` only when ``betas[0] > 0``);
``step``
    Adam's step count (a CPU scalar tensor, as in ``torch.optim.Adam``);
``prior_mean``
    only with ``prior_mean="init"``: the weights when the parameter group was added (set by the
    optimizer at construction, before any other state).

The group key ``rule`` picks the update, written once in :mod:`torch_proxvi.kernels.gaussian`:
``"proximal"`` (proximal score matching, ProxScoreOptimizer's) or ``"elbo"`` (the reparameterised
ELBO, :class:`~torch_proxvi.ADVI`'s). The common step goes through
:func:`torch_proxvi.kernels.dispatch.step`, the closure path through :meth:`Gaussian.collect`
and :meth:`Gaussian.update`; both call the same functions.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..kernels import StepHyper, dispatch, newton
from ..kernels import gaussian as kernel
from ..kernels.noise import normal_
from ..kernels.score import ScoreStats, accumulate, one_sample
from .base import START_OPTIONS, Family, register, start_std, state_dtype, sum_weights

__all__ = ["Gaussian", "first_moments", "state_dtype"]

_LOG_2PI = math.log(2 * math.pi)
#: below this lr, mean_update="newton" warns that lr looks like an Adam learning rate
NEWTON_LR_HINT = 0.01


def first_moments(states: list[dict], beta1: float, rule: str = "proximal") -> None:
    """Create the first moments of ``states`` if ``beta1`` became positive after they were made
    (the ``"solved"`` rule keeps one, of the mean)."""
    if beta1 == 0:
        return
    names = [n for n in ("mean_exp_avg", "log_scale_exp_avg") if n in dispatch.RULES[rule].STATE]
    for st in states:
        for name in names:
            if name not in st:
                st[name] = torch.zeros_like(st["mean"])


class Gaussian(Family):
    r"""``family="gaussian"``: the mean-field Gaussian.

    * :math:`\log q(\theta) = -\tfrac12 \sum (\theta - m)^2/\sigma^2 - \sum \log\sigma - \tfrac D2 \log 2\pi`
    * :math:`\nabla_\theta \log q = -(\theta - m)/\sigma^2`
    * :math:`\mathrm{KL}(q \,\|\, q') = \sum \log(\sigma'/\sigma) + (\sigma^2 + (m - m')^2)/(2\sigma'^2) - \tfrac12`
    """

    name = "gaussian"
    variational = ("mean", "log_scale")
    rules = ("proximal", "elbo", "solved")
    mean_updates = tuple(dict.fromkeys(kernel.MEAN_UPDATES + newton.MEAN_UPDATES))   # "score" first: the default
    options = dict(START_OPTIONS)

    def validate(self, group):
        if group.get("rule") == "solved":   # the rule's own defaults: rho = 0.3 lr, a start from the data
            # (a fine-tune's init_curvature follows the whole optimizer: ProxScoreOptimizer._fine_tune_start)
            for key, default in (("scale_lr_ratio", newton.SCALE_LR_RATIO), ("init_curvature", newton.INIT_CURVATURE)):
                if group.get(key) is None:
                    group[key] = default
        super().validate(group)
        allowed = dispatch.RULES[group["rule"]].MEAN_UPDATES
        if group["mean_update"] not in allowed:
            raise ValueError(f"Invalid mean_update: {group['mean_update']!r} (rule={group['rule']!r} supports "
                             f"{allowed})")
        if group["rule"] == "solved" and group["inner_steps"] != 1:
            raise ValueError(f"Invalid inner_steps: {group['inner_steps']!r} (rule='solved' solves the proximal step "
                             "exactly: it takes no inner steps; use inner_steps=1, or rule='proximal')")
        if group["rule"] == "solved" and group["mean_update"] == "newton" and group["lr"] < NEWTON_LR_HINT:
            warnings.warn(
                f"rule='solved' with mean_update='newton' takes lr as the fraction of the Newton step the mean "
                f"takes per step (0.03 to 0.3 is typical), not as Adam's learning rate: lr={group['lr']:g} "
                f"moves the mean about {1 / max(group['lr'], 1e-12):.3g} times slower than a full step. Raise lr, "
                "or use mean_update='score' to keep Adam's meaning of lr", UserWarning, stacklevel=5)

    def init_state(self, state, p, group):
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        mean = p.detach().to(state_dtype(p), copy=True)
        if group["rule"] == "solved":
            newton.init_state(state, mean, init_std=start_std(group, p), mean_update=group["mean_update"],
                              first_moments=group["betas"][0] > 0)
        else:
            kernel.init_state(state, mean, init_std=start_std(group, p), first_moments=group["betas"][0] > 0)

    def sample(self, group, params, states, generator, count=None, *, path="single"):
        out = []
        for st in states:
            m = st["mean"]
            if count is None:
                noise = normal_(torch.empty_like(m, memory_format=torch.contiguous_format), generator)
            else:
                noise = torch.randn((count, *m.shape), generator=generator, device=m.device, dtype=m.dtype)
            out.append(kernel.sample(st, noise))
        return out

    def log_prob(self, group, states, thetas):
        total = 0.0
        for st, theta in zip(states, thetas):
            z = (theta - st["mean"]) / kernel.std(st)
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
        return [kernel.mean(st) for st in states]

    def std(self, group, params, states):
        return [kernel.std(st) for st in states]

    def collect(self, group, state, theta, score, acc, weight):
        u = theta - state["mean"]
        if acc is None:
            if weight == 1.0:
                return one_sample(u, score)
            acc = ScoreStats.zeros_like(u)
        accumulate(acc, u, score, weight)
        return acc

    def update(self, group, states, accs, *, generator, path="single"):
        first_moments(states, group["betas"][0], group["rule"])
        h = StepHyper.of(group, float(states[0]["step"]))
        rule = dispatch.RULES[h.rule]
        for st, acc in zip(states, accs):
            rule.update(st, acc, h)
        torch._foreach_add_([st["step"] for st in states], float(h.inner_steps))

    def step(self, group, params, states, generator, *, path):
        first_moments(states, group["betas"][0], group["rule"])
        dispatch.step(params, states, StepHyper.of(group, float(states[0]["step"])), generator, path=path)


GAUSSIAN = register(Gaussian())
