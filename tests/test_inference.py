"""Ground truth for the inference itself.

* Bayesian linear regression: the optimal mean-field Gaussian posterior is known in closed form
  (mean = exact posterior mean, precision = diagonal of the exact precision matrix A).
* Logistic regression: at the fixed point of the update, Stein's identity gives E_q[s] = 0 and
  1 / sigma^2 = E_q[-d^2 log p / d theta^2] (the same stationarity as Gaussian ELBO-VI).
"""

import math

import pytest
import torch
from torch import nn

from torch_proxvi import ProxScoreOptimizer
from torch_proxvi.reference.testing import fit_linear_regression, linear_regression

MEAN_UPDATES = ["score", "residual"]


def fit_blr(mean_update, batch_size, steps, lr, decay, seed=0, use_closure=False, **options):
    """ProxScore on the closed-form BLR problem; returns (KL to the optimum, optimizer, model)."""
    problem = linear_regression()

    def make(params, n):
        return ProxScoreOptimizer(params, lr=lr, dataset_size=n, mean_update=mean_update,
                                  prior_precision=problem.prior_precision,
                                  **{"init_std": 0.1, **options})

    model, opt, kl = fit_linear_regression(make, problem, batch_size=batch_size, steps=steps,
                                           decay=decay, seed=seed, use_closure=use_closure)
    return kl, opt, model


@pytest.mark.parametrize("mean_update", MEAN_UPDATES)
def test_blr_full_batch_recovers_optimal_mean_field(mean_update):
    # KL at init is ~2400; 0.05 nats over 6 weights is a <10% error in every std and a
    # mean error of a small fraction of a posterior std.
    kl, _, _ = fit_blr(mean_update, batch_size=200, steps=12000, lr=1e-2, decay=500)
    assert kl <= 0.05, kl


def blr_polyak_average(mean_update, seed=0, batch_size=64, steps=16000, decay=2000, window=8000):
    """Mini-batch ProxScore on the closed-form BLR problem, with the posterior mean and log-std
    averaged over the last ``window`` steps. Returns ``(problem, mean_avg, std_avg)``."""
    problem = linear_regression()
    n = len(problem.x)
    torch.manual_seed(seed)
    model = nn.Linear(problem.x.shape[1], 1).double()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=n, mean_update=mean_update,
                             prior_precision=problem.prior_precision, init_std=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t / decay))
    g = torch.Generator().manual_seed(seed)
    params = [model.weight, model.bias]
    mean_sum = torch.zeros(len(problem.mean), dtype=torch.float64)
    log_std_sum = torch.zeros_like(mean_sum)
    for t in range(steps):
        idx = torch.randperm(n, generator=g)[:batch_size]
        opt.zero_grad()
        problem.loss(model(problem.x[idx]), problem.y[idx]).backward()
        opt.step()
        sched.step()
        if t >= steps - window:
            mean_sum += torch.cat([opt.posterior_mean(p).flatten() for p in params])
            log_std_sum += torch.cat([opt.posterior_std(p).flatten() for p in params]).log()
    return problem, mean_sum / window, (log_std_sum / window).exp()


def assert_matches_optimal_mean_field(problem, mean, std):
    std_opt = problem.precision_diag.rsqrt()
    log_std_error = (std / std_opt).log().abs().max()
    mean_error = ((mean - problem.mean) / std_opt).abs().max()
    assert log_std_error <= 0.05, log_std_error
    assert mean_error <= 0.09, mean_error


@pytest.mark.parametrize("mean_update", MEAN_UPDATES)
def test_blr_minibatch_noise_does_not_bias_the_solution(mean_update):
    # Batch 64 of n = 200: the gradient noise must not bias the fixed point. The last iterate
    # still jitters, so the posterior mean and log-std are Polyak-averaged over the last 8000 of
    # 16000 steps (lr 1e-2 / (1 + t / 2000): with the faster decay of 500 the slowest std still
    # drifts ~5% high at step 8000, slow convergence that a 10% check cannot tell from bias).
    # Seeds 0-11, both parametrisations: max_i |log(std_avg / std_opt)| <= 0.024 and
    # max_i |mean_avg - mean_opt| / std_opt <= 0.048. The bounds, 0.05 and 0.09, sit about twice
    # above those and below log(1.1) = 0.095: scaling the averaged std by 0.9 or by 1.1 fails
    # the std check for every one of those 24 runs (smallest error then: 0.097).
    problem, mean, std = blr_polyak_average(mean_update)
    assert_matches_optimal_mean_field(problem, mean, std)


def logistic_problem(n=300, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(x @ w - 0.5), generator=g)
    return x, y


@pytest.mark.parametrize("mean_update", MEAN_UPDATES)
def test_logistic_regression_reaches_the_stein_fixed_point(mean_update):
    x, y = logistic_problem()
    n, lam = len(x), 1.0
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1).double()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=n, prior_precision=lam,
                             init_std=0.1, mean_update=mean_update)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t / 500))
    for _ in range(12000):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y).backward()
        opt.step()
        sched.step()

    # Monte Carlo over S draws from q of the exact score and Hessian diagonal of log p(theta|D).
    s_draws = 20000
    params = [model.weight, model.bias]
    mean = torch.cat([opt.posterior_mean(p).flatten() for p in params])
    std = torch.cat([opt.posterior_std(p).flatten() for p in params])
    theta = mean + std * torch.randn(s_draws, len(mean), generator=torch.Generator().manual_seed(1),
                                     dtype=torch.float64)
    design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    prob = torch.sigmoid(theta @ design.T)                       # [S, n]
    score = (y - prob) @ design - lam * theta                     # [S, d + 1]
    hess_diag = (prob * (1 - prob)) @ design**2 + lam             # [S, d + 1]

    # E_q[s] = 0, in units of the posterior std: MC error ~ 1/sqrt(S) = 0.007; 0.15 allows the
    # mean to sit within 0.15 posterior std of the fixed point (a KL of ~0.01 per weight).
    assert (score.mean(0) * std).abs().max() <= 0.15, score.mean(0) * std
    # sigma^2 E_q[H] = 1: MC error < 0.5%; 0.1 allows each std within 5% of its fixed point.
    assert (std**2 * hess_diag.mean(0) - 1).abs().max() <= 0.1, std**2 * hess_diag.mean(0)
    assert math.isfinite(float(score.sum()))
