"""Non-Gaussian targets with exact normalisers, and how well a fitted family matches them.

For the evidence that the flow families fit what the Gaussian cannot (tests and
``benchmarks/families.py``). Every target is a normalised log-density of a flat parameter vector,
vectorised over leading dimensions, with its score by autograd:

* ``skew_normal`` (1-D, shape alpha = 6): density :math:`2\\varphi(x)\\Phi(\\alpha x)`;
* ``student_t`` (1-D, 3 degrees of freedom, scale 1): heavy tails;
* ``banana`` (2-D): :math:`x_1 \\sim N(0, 1.5^2)`, :math:`x_2 | x_1 \\sim N(0.4 x_1^2 - 1, 0.5^2)`;
* ``bimodal`` (2-D): an equal mixture of :math:`N((\\pm 1.8, 0), 0.6^2 I)`.

:func:`last_layer` builds the last-layer posterior of a small Bayesian network: a 2-16-1 tanh
classifier trained (MAP) on 30 points of two moons, whose output layer (17 weights, N(0, 1)
prior) gets a posterior given the frozen features. Few, separable points make it skewed and
heavy along the directions the data do not pin down; long-run HMC gives the reference draws,
and importance sampling its normaliser, so KL(q || p) is exact up to Monte Carlo error there too.

:func:`fit` runs an optimizer on one of them through the ordinary torch.optim loop
(``loss = -log p(theta)``, ``dataset_size=1``, a negligible prior, the lr decaying linearly to
zero), and :func:`divergences` measures the fitted posterior by Monte Carlo: the KL divergence
:math:`\\mathrm{KL}(q \\| p) = E_q[\\log q - \\log p]` (exact normaliser, so it is >= 0 up to
Monte Carlo error) and the Fisher divergence :math:`E_q \\|\\nabla \\log q - \\nabla \\log p\\|^2`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Target", "TARGETS", "correlated_gaussian", "fit", "divergences", "target_score", "LastLayer", "last_layer",
           "fit_last_layer", "head_draws", "last_layer_divergences"]


@dataclass(frozen=True)
class Target:
    name: str
    dim: int
    log_prob: Callable[[Tensor], Tensor]   # [..., dim] -> [...], normalised
    start: tuple[float, ...]               # where every method's mean starts


def _skew_normal(theta: Tensor) -> Tensor:
    x = theta[..., 0]
    return math.log(2.0) - 0.5 * x * x - 0.5 * math.log(2 * math.pi) + torch.special.log_ndtr(6.0 * x)


def _student_t(theta: Tensor, nu: float = 3.0) -> Tensor:
    x = theta[..., 0]
    const = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
    return const - (nu + 1) / 2 * torch.log1p(x * x / nu)


def _normal(x: Tensor, mean: float, std: float) -> Tensor:
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)


def _banana(theta: Tensor) -> Tensor:
    x1, x2 = theta[..., 0], theta[..., 1]
    return _normal(x1, 0.0, 1.5) + _normal(x2 - 0.4 * x1 * x1 + 1.0, 0.0, 0.5)


def _bimodal(theta: Tensor) -> Tensor:
    x1, x2 = theta[..., 0], theta[..., 1]
    left = _normal(x1, -1.8, 0.6) + _normal(x2, 0.0, 0.6)
    right = _normal(x1, 1.8, 0.6) + _normal(x2, 0.0, 0.6)
    return torch.logaddexp(left, right) - math.log(2.0)


def correlated_gaussian(rho: float = 0.9) -> Target:
    """N(0, [[1, rho], [rho, 1]]): a mean-field family reaches at best KL = -log(1 - rho^2) / 2."""
    cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    normal = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov)
    return Target("correlated_gaussian", 2, normal.log_prob, (0.0, 0.0))


TARGETS = {
    "skew_normal": Target("skew_normal", 1, _skew_normal, (0.0,)),
    "student_t": Target("student_t", 1, _student_t, (0.5,)),
    "banana": Target("banana", 2, _banana, (0.0, 0.0)),
    "bimodal": Target("bimodal", 2, _bimodal, (0.3, 0.0)),
}


def target_score(target: Target, theta: Tensor) -> Tensor:
    theta = theta.detach().requires_grad_()
    with torch.enable_grad():
        return torch.autograd.grad(target.log_prob(theta).sum(), theta)[0]


def fit(target: Target, make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer], *,
        steps: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Fit ``make_optimizer([theta])`` to ``target``; return (optimizer, theta parameter).

    The learning rate of every group decays linearly to zero over ``steps`` (a LambdaLR), so the
    last iterate is an average over the noise of the final steps rather than one noisy draw.
    """
    torch.manual_seed(seed)
    theta = torch.nn.Parameter(torch.tensor(target.start, dtype=dtype))
    opt = make_optimizer([theta])
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / steps))
    for _ in range(steps):
        opt.zero_grad()
        (-target.log_prob(theta)).backward()
        opt.step()
        schedule.step()
    return opt, theta


@torch.no_grad()
def divergences(opt, theta: Tensor, target: Target, *, samples: int = 4000,
                seed: int = 1) -> dict[str, float]:
    """KL(q || p) and Fisher divergence of the posterior that ``opt`` holds for ``theta``."""
    group = opt._group_of(theta)
    family = opt._family(group)
    state = [opt.state[theta]]
    generator = torch.Generator().manual_seed(seed)
    draws = family.sample(group, [theta], state, generator, samples)[0]
    log_q = family.log_prob(group, state, [draws])
    score_q = family.score(group, state, [draws])[0]
    kl = (log_q - target.log_prob(draws)).mean()
    fisher = ((score_q - target_score(target, draws)) ** 2).sum(-1).mean()
    return {"kl": float(kl), "fisher": float(fisher)}


@dataclass
class LastLayer:
    """The last-layer posterior of a small classifier (see the module docstring)."""

    features: Tensor          # [N, H] frozen hidden features of the training points
    labels: Tensor            # [N] 0/1
    grid_features: Tensor     # [G, H] features on a grid over the input square, for predictives
    hmc_draws: Tensor         # [S, H + 1] reference draws of (weight..., bias)
    log_normaliser: float     # log of the integral of exp(log_posterior)
    prior_std: float = 1.0

    @property
    def dim(self) -> int:
        return self.features.shape[1] + 1

    def nll(self, weight: Tensor, bias: Tensor) -> Tensor:
        """Mean binary cross-entropy of the head (``weight`` [..., H], ``bias`` [...])."""
        logits = self.features @ weight.unsqueeze(-1) + bias.unsqueeze(-1).unsqueeze(-1)
        labels = self.labels.to(logits.dtype).expand(logits.shape[:-1]).unsqueeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, reduction="none").squeeze(-1).mean(-1)

    def log_posterior(self, theta: Tensor) -> Tensor:
        """Unnormalised log posterior of flat ``theta`` [..., H + 1] (N(0, prior_std^2) prior)."""
        n = len(self.labels)
        return -n * self.nll(theta[..., :-1], theta[..., -1]) - 0.5 * (theta * theta).sum(-1) / self.prior_std**2


def _moons(n: int, noise: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    angle = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    label = torch.arange(n) % 2
    x = torch.where(label == 0, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(label == 0, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return points, label


def last_layer(n: int = 30, hidden: int = 4, seed: int = 0, hmc_samples: int = 2000,
               prior_std: float = 5.0, noise: float = 0.1, weight_decay: float = 1.0) -> LastLayer:
    """Train the body (Adam, MAP), freeze it, and sample the head's posterior with HMC."""
    from .hmc import hmc, split_rhat

    g = torch.Generator().manual_seed(seed)
    x, labels = _moons(n, noise, g)
    torch.manual_seed(seed)
    body = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh()).double()
    head = torch.nn.Linear(hidden, 1).double()
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(1500):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            head(body(x)).squeeze(-1), labels.double())
        params = torch.cat([q.reshape(-1) for q in [*body.parameters(), *head.parameters()]])
        (loss + 0.5 * weight_decay * (params * params).sum() / n).backward()
        opt.step()
    axis = torch.linspace(-1.5, 2.5, 25, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis - 0.5, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        problem = LastLayer(body(x), labels, body(grid), torch.empty(0), 0.0, prior_std)
    start = torch.zeros(8, problem.dim, dtype=torch.float64)
    res = hmc(problem.log_posterior, start, num_samples=hmc_samples // 8, warmup=500,
              num_leapfrog=16, thin=2, generator=g)
    if float(split_rhat(res.samples).max()) > 1.05:
        raise RuntimeError("the HMC reference did not mix (split R-hat > 1.05)")
    problem.hmc_draws = res.samples.reshape(-1, problem.dim)
    problem.log_normaliser = _log_normaliser(problem, g)
    return problem


def _log_normaliser(problem: LastLayer, generator: torch.Generator, draws: int = 200_000) -> float:
    """Importance sampling from a multivariate t (5 dof) fitted to the HMC draws, widened 1.5x."""
    mean = problem.hmc_draws.mean(0)
    cov = torch.cov(problem.hmc_draws.T) * 1.5**2
    chol = torch.linalg.cholesky(cov)
    dim, dof = problem.dim, 5.0
    z = torch.randn(draws, dim, generator=generator, dtype=torch.float64)
    chi2 = 2 * torch._standard_gamma(torch.full((draws,), dof / 2, dtype=torch.float64), generator=generator)
    theta = mean + (z * torch.sqrt(dof / chi2).unsqueeze(-1)) @ chol.T
    u = torch.linalg.solve_triangular(chol, (theta - mean).T, upper=False).T
    log_t = (math.lgamma((dof + dim) / 2) - math.lgamma(dof / 2) - dim / 2 * math.log(dof * math.pi)
             - torch.log(torch.diagonal(chol)).sum() - (dof + dim) / 2 * torch.log1p((u * u).sum(-1) / dof))
    log_w = torch.cat([problem.log_posterior(c) for c in theta.split(20_000)]) - log_t
    return float(torch.logsumexp(log_w, 0) - math.log(draws))


def fit_last_layer(problem: LastLayer, make_optimizer, *, steps: int, seed: int = 0):
    """Fit ``make_optimizer(head.parameters())`` to the head's posterior (full-batch loss, the
    lr decaying linearly to zero); return (optimizer, head)."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(problem.features.shape[1], 1).double()
    opt = make_optimizer(list(head.parameters()))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / steps))
    for _ in range(steps):
        opt.zero_grad()
        problem.nll(head.weight[0], head.bias[0]).backward()
        opt.step()
        schedule.step()
    return opt, head


def _rbf_mmd(a: Tensor, b: Tensor) -> float:
    """Squared MMD with a Gaussian kernel of median-heuristic bandwidth (biased estimate)."""
    both = torch.cat([a, b])
    dist = torch.cdist(both, both) ** 2
    bandwidth = dist.median()
    k = torch.exp(-dist / bandwidth)
    n = len(a)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


@torch.no_grad()
def head_draws(opt, head: torch.nn.Module, samples: int, generator: torch.Generator):
    """``samples`` draws of the head's flat (weight..., bias) from ``opt``'s posterior, with
    their log-density and score under it."""
    params = [head.weight, head.bias]
    group = opt._group_of(head.weight)
    family = opt._family(group)
    states = [opt.state[p] for p in params]
    if family.joint:
        draws = family.sample(group, params, states, generator, samples)
        log_q = family.log_prob(group, states, draws)
        score_q = family.score(group, states, draws)
    else:
        draws = [family.sample(group, [p], [st], generator, samples)[0] for p, st in zip(params, states)]
        log_q = sum(family.log_prob(group, [st], [d]) for st, d in zip(states, draws))
        score_q = [family.score(group, [st], [d])[0] for st, d in zip(states, draws)]
    theta = torch.cat([d.reshape(samples, -1) for d in draws], -1).double()
    return theta, log_q.double(), torch.cat([s.reshape(samples, -1) for s in score_q], -1).double()


@torch.no_grad()
def last_layer_divergences(opt, head: torch.nn.Module, problem: LastLayer, *, samples: int = 4000,
                           seed: int = 1) -> dict[str, float]:
    """KL(q || p) (exact normaliser), Fisher divergence, MMD to the HMC draws and the mean
    predictive KL(HMC || q) on the input grid, for the head's posterior held by ``opt``."""
    generator = torch.Generator().manual_seed(seed)
    theta, log_q, score_q = head_draws(opt, head, samples, generator)
    kl = (log_q - problem.log_posterior(theta)).mean() + problem.log_normaliser
    with torch.enable_grad():
        t = theta.clone().requires_grad_()
        score_p = torch.autograd.grad(problem.log_posterior(t).sum(), t)[0]
    fisher = ((score_q - score_p) ** 2).sum(-1).mean()
    reference = problem.hmc_draws
    mmd = _rbf_mmd(theta[:2000], reference[torch.randperm(len(reference), generator=generator)[:2000]])

    def predictive(w):
        return torch.sigmoid(problem.grid_features @ w[:, :-1].T + w[:, -1]).mean(1)

    p_ref, p_q = predictive(reference).clamp(1e-9, 1 - 1e-9), predictive(theta).clamp(1e-9, 1 - 1e-9)
    pred_kl = (p_ref * torch.log(p_ref / p_q) + (1 - p_ref) * torch.log((1 - p_ref) / (1 - p_q))).mean()
    return {"kl": float(kl), "fisher": float(fisher), "mmd": mmd, "predictive_kl": float(pred_kl)}
