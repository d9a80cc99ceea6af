"""What is special to ProxScoreOptimizer (the generic contract is in test_contract.py)."""

import math

import pytest
import torch
from test_inference import blr_problem, kl_to_optimal_mean_field
from torch import nn

from torch_proxvi import ProxScoreOptimizer


def quadratic_step(opt, model, target):
    opt.zero_grad()
    ((model.weight - target) ** 2).sum().backward()
    opt.step()


@pytest.mark.parametrize("prior_mean,expected", [("zero", 0.0), ("init", 0.5)])
def test_prior_mean_centres_the_prior(prior_mean, expected):
    # With no data term the posterior is the prior: its mean is 0 or the initial weights.
    # The faithful (residual) update is exact on a Gaussian target: its control variate cancels
    # the sampling noise once sigma^2 = 1 / precision, so tight tolerances apply.
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    nn.init.constant_(model.weight, 0.5)
    opt = ProxScoreOptimizer(model.parameters(), lr=5e-2, dataset_size=10, prior_precision=4.0,
                             prior_mean=prior_mean, init_std=0.3, mean_update="residual")
    with torch.no_grad():  # weights changed after construction: "init" means at construction
        model.weight.fill_(2.0)
    for _ in range(1000):
        opt.zero_grad()
        (0.0 * model.weight).sum().backward()
        opt.step()
    mean = opt.posterior_mean(model.weight)
    assert torch.allclose(mean, torch.full_like(mean, expected), atol=1e-4), mean
    # the prior's std is 1 / sqrt(4) = 0.5; the scale moves there from 0.3
    assert (opt.posterior_std(model.weight) - 0.5).abs().max() < 1e-3


def test_warmup_freezes_the_scale_and_scale_lr_ratio_scales_it():
    model = nn.Linear(4, 2)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    opts = {name: ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=32, **kw)
            for name, kw in {"warm": dict(warmup_steps=5), "frozen": dict(scale_lr_ratio=0.0),
                             "plain": {}}.items()}
    for name, opt in opts.items():
        torch.manual_seed(0)
        m = nn.Linear(4, 2)
        opt = ProxScoreOptimizer(m.parameters(), lr=1e-2, dataset_size=32,
                                 **{"warm": dict(warmup_steps=5), "frozen": dict(scale_lr_ratio=0.0),
                                    "plain": {}}[name])
        stds = []
        for _ in range(8):
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
            stds.append(opt.posterior_std(m.weight).clone())
        init = torch.full_like(stds[0], 1e-3)
        if name == "warm":
            assert all(torch.allclose(s, init) for s in stds[:5])
            assert not torch.allclose(stds[-1], init)
        elif name == "frozen":
            assert all(torch.allclose(s, init) for s in stds)
        else:
            assert not torch.allclose(stds[1], init)


def test_closure_with_several_samples_recovers_the_blr_posterior():
    # K = 4 samples per step, scores averaged over them: same fixed point as K = 1.
    x, y, mean, prec = blr_problem()
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1).double()
    opt = ProxScoreOptimizer(model.parameters(), lr=3e-2, dataset_size=len(x), init_std=0.1,
                             mc_samples=4, mean_update="residual")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t / 300))

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).mean() / 0.5**2
        loss.backward()
        return loss

    for _ in range(4000):
        opt.step(closure)
        sched.step()
    assert kl_to_optimal_mean_field(opt, model, mean, prec) <= 0.05


def test_inner_steps_with_prox_weight_reach_the_same_posterior():
    # More inner steps per sample, with the KL trust region, converge to the same fixed point.
    x, y, mean, prec = blr_problem()
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1).double()
    opt = ProxScoreOptimizer(model.parameters(), lr=3e-2, dataset_size=len(x), init_std=0.1,
                             inner_steps=3, prox_weight=1.0, mean_update="residual")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t / 300))
    for _ in range(4000):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).mean() / 0.5**2).backward()
        opt.step()
        sched.step()
    assert kl_to_optimal_mean_field(opt, model, mean, prec) <= 0.05
    assert float(opt.state[model.weight]["step"]) == 3 * 4000


def test_temperature_scales_the_likelihood_term():
    # Cold posterior (T < 1) on BLR: the optimal mean-field precision is diag(X'X / (T s^2) + l).
    x, y, _, _ = blr_problem()
    t = 0.25
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 1).double()
    opt = ProxScoreOptimizer(model.parameters(), lr=3e-2, dataset_size=len(x), init_std=0.05,
                             temperature=t, mean_update="residual")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s / 300))
    for _ in range(6000):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).mean() / 0.5**2).backward()
        opt.step()
        sched.step()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    expected = torch.diag(design.T @ design) / (t * 0.25) + 1.0
    got = 1 / opt.posterior_std(model.weight).flatten() ** 2
    assert torch.allclose(got, expected[:-1], rtol=0.1), (got, expected)
    assert math.isfinite(float(got.sum()))


def test_a_score_that_overflows_is_skipped_like_a_non_finite_gradient():
    # Finite gradients whose score N * grad overflows float32 must not reach the state.
    model = nn.Linear(3, 2)
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=1e10)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    (1e30 * model(torch.ones(1, 3))).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not any(opt.state[p] for p in model.parameters())  # no state was created
    assert opt.skipped_steps == 1
