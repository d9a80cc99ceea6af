"""Posteriors with a known answer for the posterior-quality benchmark and the 2-D toy example.

Every problem is a flat parameter vector theta of D numbers with a N(0, 1) prior and a mean
negative log-likelihood ``nll(theta, idx)`` over the data points ``idx`` that accepts a batch of
C parameter vectors ``[C, D]`` and returns ``[C]``. The optimizers see one ``nn.Parameter`` of
shape ``[D]`` and the loss ``nll(theta[None], idx)[0]``, exactly as in a training loop; HMC sees
the log posterior ``-N * nll(theta, all) - |theta|^2 / 2``.

Two references per problem:

* ``mean``, ``cov``: the exact Gaussian posterior (linear regression) or the Gaussian fitted to
  long-run HMC (:mod:`torch_proxvi.reference.hmc`), the target of the dense GSM and BaM;
* ``mf_mean``, ``mf_var``: the mean-field projection argmin_q KL(q || p) over diagonal
  Gaussians, the common fixed point of every mean-field method here (the ELBO's stationarity
  and the Stein equations coincide). Closed form for linear regression (the mean and
  ``1 / diag(precision)``); otherwise the ELBO maximised by L-BFGS on 4096 fixed antithetic
  draws (a deterministic objective), started from the HMC moments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from torch_proxvi.reference.hmc import hmc, split_rhat
from torch_proxvi.reference.testing import linear_regression

F64 = torch.float64


@dataclass
class Problem:
    name: str
    n: int                                    # dataset size N
    nll: Callable[[Tensor, Tensor], Tensor]   # (theta [C, D], idx) -> mean NLL [C]
    init: Tensor                              # [D] starting mean of every method
    mean: Tensor                              # reference posterior mean [D]
    cov: Tensor                               # reference posterior covariance [D, D]
    note: str = ""
    mf_mean: Tensor | None = None
    mf_var: Tensor | None = None
    predict: Callable[[Tensor], Tensor] | None = None   # theta [C, D] -> f on a grid [C, G]
    pred_mean: Tensor | None = None                     # reference predictive on the grid [G]
    pred_var: Tensor | None = None                      # (observation noise included)
    samples: Tensor | None = None                       # HMC draws [S, D]

    @property
    def dim(self) -> int:
        return len(self.init)

    def log_posterior(self, theta: Tensor) -> Tensor:
        return -self.n * self.nll(theta, torch.arange(self.n)) - 0.5 * (theta * theta).sum(-1)


def blr() -> Problem:
    """Bayesian linear regression (n=200, 5 inputs + bias): the exact posterior is Gaussian."""
    p = linear_regression(n=200, d=5, noise_std=0.5, prior_precision=1.0, seed=0)
    design = torch.cat([p.x, torch.ones(len(p.x), 1, dtype=F64)], 1)
    y = p.y.squeeze(1)
    precision = design.T @ design / p.noise_std**2 + torch.eye(design.shape[1], dtype=F64)

    def nll(theta, idx):
        return 0.5 * ((design[idx] @ theta.T - y[idx, None]) ** 2).mean(0) / p.noise_std**2

    cov = torch.linalg.inv(precision)
    return Problem("linear regression (D=6)", len(y), nll, torch.zeros(6, dtype=F64), p.mean, cov,
                   "closed form", p.mean, 1 / precision.diagonal())


def _hmc_reference(problem: Problem, init: Tensor, *, chains: int, samples: int, warmup: int,
                   leapfrog: int, seed: int) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    start = init + 0.01 * torch.randn(chains, len(init), generator=gen, dtype=F64)
    res = hmc(problem.log_posterior, start, num_samples=samples, warmup=warmup,
              num_leapfrog=leapfrog, generator=gen)
    flat = res.samples.reshape(-1, len(init))
    rhat = float(split_rhat(res.samples).max())
    problem.mean, problem.cov, problem.samples = flat.mean(0), torch.cov(flat.T), flat
    problem.mf_mean, problem.mf_var = _mean_field_projection(problem, seed)
    shift = float(((problem.mf_mean - problem.mean).abs() / problem.cov.diagonal().sqrt()).max())
    problem.note = (f"HMC {chains} chains x {samples} draws, accept {res.accept_rate:.2f}, "
                    f"max split-Rhat {rhat:.3f}, {res.divergences} divergences; mean-field "
                    f"projection's mean within {shift:.2f} posterior sd of the HMC mean")
    return problem


def _mean_field_projection(problem: Problem, seed: int, draws: int = 4096) -> tuple[Tensor, Tensor]:
    """argmax of the mean-field ELBO on fixed antithetic draws, from the HMC moments."""
    gen = torch.Generator().manual_seed(seed + 1)
    half = torch.randn(draws // 2, problem.dim, generator=gen, dtype=F64)
    eps = torch.cat([half, -half])
    mean = problem.mean.clone().requires_grad_()
    log_std = (0.5 / torch.linalg.inv(problem.cov).diagonal()).log().requires_grad_()
    opt = torch.optim.LBFGS([mean, log_std], lr=1, max_iter=500, tolerance_grad=1e-10,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        theta = mean + log_std.exp() * eps
        loss = -problem.log_posterior(theta).mean() - log_std.sum()
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    return mean.detach(), (2 * log_std.detach()).exp()


def logistic(seed: int = 0) -> Problem:
    """Bayesian logistic regression on breast cancer (569 x 30 standardised + bias), N(0,1) prior."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=F64)
    x = (x - x.mean(0)) / x.std(0)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1)
    y = torch.tensor(data.target, dtype=F64)

    def nll(theta, idx):
        logits = design[idx] @ theta.T                      # [n, C]
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y[idx, None].expand_as(logits), reduction="none").mean(0)

    problem = Problem("logistic regression (D=31)", len(y), nll, torch.zeros(31, dtype=F64),
                      torch.zeros(31, dtype=F64), torch.eye(31, dtype=F64))
    return _hmc_reference(problem, _map(problem, problem.init), chains=8, samples=1500,
                          warmup=1000, leapfrog=25, seed=seed)


def bnn(seed: int = 0, hidden: int = 3, n: int = 100) -> Problem:
    """A 1-3-1 tanh network on y = sin(x) + noise (n=100, noise std 0.1), N(0,1) prior.

    The posterior has many symmetric modes; the reference is HMC started at one MAP, and every
    method starts at the same MAP: the benchmark compares local posteriors around that mode.
    Within the mode the weights lie on curved ridges (marginal sds 5-30x the mean-field sds), so
    parameter-space KL to a mean-field target is ill-conditioned; the benchmark compares the
    predictive instead (``predict`` on 41 inputs in [-4, 4], against HMC's).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=F64) * 6 - 3
    y = torch.sin(x) + 0.1 * torch.randn(n, generator=g, dtype=F64)
    h = hidden

    def net(theta, inputs):                                 # -> [len(inputs), C]
        w1, b1, w2, b2 = theta[:, :h], theta[:, h:2 * h], theta[:, 2 * h:3 * h], theta[:, 3 * h]
        return (torch.tanh(inputs[:, None, None] * w1 + b1) * w2).sum(-1) + b2

    def nll(theta, idx):
        return (0.5 * ((net(theta, x[idx]) - y[idx, None]) / 0.1) ** 2).mean(0)

    dim = 3 * h + 1
    init = 0.5 * torch.randn(dim, generator=g, dtype=F64)
    problem = Problem(f"BNN regression 1-{h}-1 (D={dim})", n, nll, init, init, torch.eye(dim, dtype=F64))
    problem.init = _map(problem, init)
    problem = _hmc_reference(problem, problem.init, chains=8, samples=1500, warmup=1500,
                             leapfrog=30, seed=seed)
    grid = torch.linspace(-4, 4, 41, dtype=F64)
    problem.predict = lambda theta: net(theta, grid).T
    f = problem.predict(problem.samples)
    problem.pred_mean, problem.pred_var = f.mean(0), f.var(0) + 0.1**2
    return problem


def _map(problem: Problem, init: Tensor, steps: int = 3000) -> Tensor:
    """The posterior mode from ``init`` by full-batch L-BFGS."""
    theta = init.clone().requires_grad_()
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=steps, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -problem.log_posterior(theta[None])[0]
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()
