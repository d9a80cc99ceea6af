"""What is special to ProxScoreOptimizer (the generic contract is in test_contract.py)."""

import pytest
import torch
from test_inference import fit_blr
from torch import nn

from torch_proxvi import ProxScoreOptimizer
from torch_proxvi.reference.testing import linear_regression


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


# Step 1 runs at the initial weights (u = 0), where the scale's gradient is exactly zero.
@pytest.mark.parametrize("options,first_move", [
    (dict(warmup_steps=5), 6),          # frozen for 5 steps, then it moves
    (dict(scale_lr_ratio=0.0), None),   # never moves
    ({}, 2),                            # moves from the first step with u != 0
])
def test_warmup_and_scale_lr_ratio_control_when_the_scale_moves(options, first_move):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=32, init_std=0.05, **options)
    moved = []
    for _ in range(8):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        moved.append(not torch.allclose(opt.posterior_std(model.weight), torch.tensor(0.05)))
    assert moved == [first_move is not None and step >= first_move for step in range(1, 9)], moved


def test_closure_with_several_samples_recovers_the_blr_posterior():
    # K = 4 samples per step, scores averaged over them: same fixed point as K = 1.
    kl, _, _ = fit_blr("residual", batch_size=200, steps=4000, lr=3e-2, decay=300,
                       use_closure=True, mc_samples=4)
    assert kl <= 0.05


def test_inner_steps_with_prox_weight_reach_the_same_posterior():
    # More inner steps per sample, with the KL trust region, converge to the same fixed point
    # (4 seeds measured 0.004-0.025 at this budget).
    kl, opt, model = fit_blr("residual", batch_size=200, steps=4000, lr=3e-2, decay=300,
                             inner_steps=3, prox_weight=1.0)
    assert kl <= 0.05
    assert float(opt.state[model.weight]["step"]) == 3 * 4000


def test_temperature_scales_the_likelihood_term():
    # Cold posterior (T < 1): the optimal mean-field precision is diag(X'X / (T s^2)) + prior.
    t = 0.25
    _, opt, model = fit_blr("residual", batch_size=200, steps=6000, lr=3e-2, decay=300,
                            temperature=t, init_std=0.05)
    problem = linear_regression()
    likelihood_part = problem.precision_diag - problem.prior_precision
    expected = likelihood_part / t + problem.prior_precision
    got = 1 / opt.posterior_std(model.weight).flatten() ** 2
    assert torch.allclose(got, expected[:-1], rtol=0.1), (got, expected)


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


def test_numpy_numbers_are_accepted_as_hyperparameters():
    import numpy as np

    model = nn.Linear(2, 2)
    opt = ProxScoreOptimizer(model.parameters(), lr=np.float32(1e-3), dataset_size=np.int64(100),
                             mc_samples=np.int64(2))
    assert opt.param_groups[0]["dataset_size"] == 100
    with pytest.raises(ValueError, match="Invalid dataset_size"):
        ProxScoreOptimizer(model.parameters(), dataset_size=True)
