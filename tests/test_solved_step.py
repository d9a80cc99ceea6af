"""``rule="solved"`` (torch_proxvi/kernels/newton.py): the Gaussian proximal step solved per weight.

Checked against the float64 reference solver (kernels/solved.py, itself checked against autograd +
LBFGS in tests/test_solved.py), the scale stationarity's linearised limit, the Gaussian fixed point,
closed-form Bayesian linear regression, and the optimizer-level contract of the rule (data-driven
start, state, validation). The generic contract suite runs the rule too (tests/conftest.py).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from torch_proxvi import ProxScoreOptimizer
from torch_proxvi.kernels import StepHyper, newton, one_sample, solved
from torch_proxvi.kernels import gaussian as kernel_gaussian
from torch_proxvi.kernels.score import ScoreStats
from torch_proxvi.reference.testing import fit_linear_regression, linear_regression

F64 = torch.float64


def random_problems(n=100_000, seed=0, dtype=torch.float32):
    """Per weight: a = <u^2> P_t uniform in [0, 3] and b = <u s> normal with std 3 (either sign)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g, dtype=F64) * 3
    b = torch.randn(n, generator=g, dtype=F64) * 3
    return a.to(dtype), b.to(dtype)


def cubic(p, a, b, rho):
    lam = 4 * (1 - rho) / rho
    return 4 * p * p * (a * p + b) + lam * (p - 1)


@pytest.mark.parametrize("rho", [1e-4, 1e-3, 1e-2])
def test_precision_is_a_local_minimiser_of_the_scale_objective(rho):
    # A root of f = 4ap^3 + 4bp^2 + lam(p - 1) where f rises: a local minimum of the scale part of
    # the proximal objective (dG/dlog p = f / 2p). Relative residual: float64 arithmetic on the
    # float32 root, whose rounding alone leaves ~1e-7.
    a, b = random_problems()
    p = newton.precision_ratio(a, b, rho).double()
    a, b = a.double(), b.double()
    scale = 4 * (1 - rho) / rho * p + 4 * p * p * (a * p + b.abs())
    assert float((cubic(p, a, b, rho) / scale).abs().max()) < 1e-5
    assert bool((cubic(p * (1 + 1e-4), a, b, rho) > cubic(p * (1 - 1e-4), a, b, rho)).all())


@pytest.mark.parametrize("rho", [1e-4, 1e-3, 1e-2])
def test_precision_is_the_exact_minimiser_where_the_objective_is_convex(rho):
    # Where G is convex (lam <= 108 a, no mean term: kernels/solved.py) the minimiser is unique and
    # the step must give the reference's float64 answer (solve with U = C = 0, lambda_m = 0).
    # (At rho = 0.1, 3 of 1e5 such problems, moves of p ~ 4, stop short by <= 0.7 % after
    # NEWTON_ITERS: the module docstring says so.)
    a, b = random_problems(n=20_000, seed=1)   # the float64 reference costs ~440 evaluations each
    lam = 4 * (1 - rho) / rho
    a = a + lam / 108          # every problem convex
    p = newton.precision_ratio(a, b, rho).double()
    zeros = torch.zeros_like(p)
    stats = ScoreStats(zeros, a.double(), zeros, b.double())
    _, precision = solved.solve(stats, zeros, torch.ones_like(p), 0.0, lam)
    torch.testing.assert_close(p, precision, rtol=2e-6, atol=0)


@pytest.mark.parametrize("rho", [1e-4, 0.03, 0.5])
def test_first_order_precision_is_the_linearised_root_clamped_to_the_bracket(rho):
    # The definition, case by case: below 1 (f(1) = 4(a + b) > 0) the bracket is
    # [lam / (lam + 4a + 4b+), 1]; above 1 it is [1, min(-b/a, CAP * linear)]. The step computes it
    # as one quotient; this checks that reduction on random and on scale-spread statistics, float64.
    g = torch.Generator().manual_seed(3)
    a, b = random_problems(n=50_000, seed=4, dtype=F64)
    def spread(n):   # magnitudes from 1e-20 to 1e20
        return 10 ** (torch.rand(n, generator=g, dtype=F64) * 40 - 20)

    a = torch.cat([a, torch.zeros(100), spread(50_000)])
    signs = torch.randn(50_000, generator=g, dtype=F64).sign()
    b = torch.cat([b, torch.randn(100, generator=g, dtype=F64), signs * spread(50_000)])
    lam = 4 * (1 - rho) / rho
    linear = (lam - 4 * b) / (lam + 4 * a)
    below = a + b > 0
    lo = torch.where(below, lam / (lam + 4 * a + 4 * b.clamp_min(0)), torch.ones_like(a))
    hi = torch.where(below, torch.ones_like(a), torch.minimum(-b / a, newton.CAP * linear))
    expected = torch.minimum(torch.maximum(linear, lo), hi)
    p = newton.precision_ratio(a, b, rho, iterations=0)
    torch.testing.assert_close(p, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("iterations", [0, newton.NEWTON_ITERS])
def test_precision_stays_positive_and_finite_for_any_input(iterations):
    g = torch.Generator().manual_seed(2)
    n = 20_000
    a = torch.cat([torch.zeros(n // 4), 10 ** (torch.rand(3 * n // 4, generator=g) * 60 - 30)])
    b = torch.randn(n, generator=g).sign() * 10 ** (torch.rand(n, generator=g) * 60 - 30)
    b[:100] = 0
    for rho in (0.0, 1e-30, 1e-6, 1e-3, 0.3, 1.0, 5.0):
        p = newton.precision_ratio(a, b, rho, iterations)
        assert bool(torch.isfinite(p).all() and (p > 0).all()), rho


@pytest.mark.parametrize("mean_update, bound", [("score", 0.1), ("newton", None)])
def test_precision_under_score_noise_keeps_the_gaussian_fixed_point(mean_update, bound):
    # At q = the Gaussian target (P_t = H = 1) with mini-batch-like noise in the score,
    # s = -u + xi (xi ~ N(0, 3^2), independent of the draw u), the precision must not drift:
    # E[log p] = 0. The exact root is convex in the noisy b, so it drifts up, 0.43 rho per step
    # here, and a fixed point shifted as far is a posterior too narrow (logistic regression at
    # batch 32, docs/benchmarks.md); the first-order root, which the Adam mean takes, drifts by
    # -0.046 rho +- 0.003 rho (1e6 draws). The bound 0.1 rho is 18 standard errors from it and
    # fails for the exact root. The Newton mean keeps the exact root (with the first-order one its
    # sigma^2-scaled step diverged on the BNN): its drift is checked to be the exact root's.
    n, rho = 1_000_000, 0.03
    g = torch.Generator().manual_seed(6)
    u = torch.randn(n, generator=g, dtype=F64)
    s = -u + 3 * torch.randn(n, generator=g, dtype=F64)
    state = {"mean": torch.zeros(n, dtype=F64), "log_scale": torch.zeros(n, dtype=F64)}
    if mean_update == "score":
        state["mean_exp_avg_sq"] = torch.zeros(n, dtype=F64)
    one_step(state, one_sample(u, s), mean_update=mean_update, scale_lr=rho, lr=0.1)
    drift = float((-2 * state["log_scale"]).mean()) / rho      # log p = -2 (change of log sigma)
    if bound is not None:
        assert abs(drift) < bound, drift
    else:
        exact = float(newton.precision_ratio(u * u, u * s, rho).log().mean()) / rho
        assert drift == pytest.approx(exact, rel=1e-9) and exact > 0.3, (drift, exact)


def test_small_trust_fraction_is_the_linearised_stein_update():
    # rho -> 0: p = 1 + rho (H_hat / P_t - 1) with E[a] = 1, i.e. (p - 1) / rho -> -(a + b)
    a, b = random_problems(n=1000, dtype=F64)
    rho = 1e-7
    p = newton.precision_ratio(a, b, rho)
    torch.testing.assert_close((p - 1) / rho, -(a + b), rtol=1e-4, atol=1e-4)


def one_step(state, stats, **kw):
    h = StepHyper(lr=kw.get("lr", 0.1), scale_lr=kw.get("scale_lr", 0.1), beta1=kw.get("beta1", 0.9), beta2=0.999,
                  eps=1e-8, score_scale=-1.0, prior_precision=0.0, prox_weight=1.0, step=kw.get("step", 0.0),
                  rule="solved", mean_update=kw.get("mean_update", "newton"))
    newton.update(state, stats, h)


def test_the_gaussian_target_is_a_fixed_point():
    # q = N(m*, 1/H) on a Gaussian target: the score is -H (theta - m*), so a + b = 0 for every
    # draw and the precision does not move (p = 1 up to rounding); the mean moves by a zero-mean
    # step (the score's noise at the draw). 1e6 independent weights = 1e6 draws.
    n = 1_000_000
    g = torch.Generator().manual_seed(3)
    curvature = 10 ** (torch.rand(n, generator=g, dtype=F64) * 4 - 2)
    target = torch.randn(n, generator=g, dtype=F64)
    state = {"mean": target.clone(), "log_scale": -0.5 * curvature.log(), "mean_exp_avg": torch.zeros(n, dtype=F64)}
    theta = target + curvature.rsqrt() * torch.randn(n, generator=g, dtype=F64)
    one_step(state, one_sample(theta - state["mean"], -curvature * (theta - target)))
    torch.testing.assert_close(state["log_scale"], -0.5 * curvature.log(), rtol=0, atol=1e-12)
    z = (state["mean"] - target) * curvature.sqrt()
    assert abs(float(z.mean())) < 5 * float(z.std()) / math.sqrt(n)


def test_newton_mean_step_goes_to_the_mode_of_a_gaussian_target_at_full_step():
    # lr = 1 (eta = 1), no averaging, the exact curvature: one step lands on m* whatever the draw
    # (the Newton step sigma^2 * score with sigma^2 = 1/H; U's noise cancels only with the draw's
    # own score, which the "newton" mean drops, so here the draw is at the mean: u = 0).
    n = 1000
    g = torch.Generator().manual_seed(4)
    curvature = 10 ** (torch.rand(n, generator=g, dtype=F64) * 4 - 2)
    target = torch.randn(n, generator=g, dtype=F64)
    state = {"mean": torch.zeros(n, dtype=F64), "log_scale": -0.5 * curvature.log()}
    u = torch.zeros(n, dtype=F64)
    one_step(state, one_sample(u, -curvature * (state["mean"] - target)), lr=1.0, scale_lr=0.0)
    torch.testing.assert_close(state["mean"], target, rtol=1e-12, atol=1e-12)


def test_newton_mean_is_the_closed_form_at_the_solved_precision():
    # kernels/solved.py: x = p (p u_bar + c) / (p^2 + mu); at U = 0, delta = sigma_t^2 p C / (p^2 + mu),
    # mu = lambda_m / 2 = (1 - eta) / eta: the mean's stationarity
    # at the precision the step chose (p read back from the state), no averaging (beta1 = 0).
    n = 10_000
    g = torch.Generator().manual_seed(5)
    log_scale_t = torch.randn(n, generator=g, dtype=F64)
    mean_t = torch.randn(n, generator=g, dtype=F64)
    u = torch.zeros(n, dtype=F64)
    a = torch.rand(n, generator=g, dtype=F64) * 2 * torch.exp(2 * log_scale_t)   # K > 1: <u^2> > 0, <u> = 0
    s = torch.randn(n, generator=g, dtype=F64) * torch.exp(-log_scale_t)
    b = torch.randn(n, generator=g, dtype=F64)
    stats = ScoreStats(u, a, s, b)
    state = {"mean": mean_t.clone(), "log_scale": log_scale_t.clone()}
    eta = 0.2
    one_step(state, stats, lr=eta, scale_lr=0.05, beta1=0.0)
    p = torch.exp(-2 * (state["log_scale"] - log_scale_t))
    assert float((p - 1).abs().max()) > 0.01                  # the precision moved
    mu = (1 - eta) / eta
    expected = mean_t + torch.exp(2 * log_scale_t) * p * s / (p * p + mu)
    torch.testing.assert_close(state["mean"], expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ the optimizer
def make(model, **kw):
    return ProxScoreOptimizer(model.parameters(), **{"lr": 0.05, "dataset_size": 500, "rule": "solved", **kw})


@pytest.mark.parametrize("kw, expected", [
    ({}, (500 * 5.0 + 1.0) ** -0.5),
    ({"init_curvature": 2.0, "prior_precision": 10.0, "temperature": 0.5}, (500 * 2.0 / 0.5 + 10.0) ** -0.5),
    ({"init_std": 0.3}, 0.3),
    ({"rule": "proximal"}, 1e-3),
    ({"rule": "proximal", "init_curvature": 2.0}, (500 * 2.0 + 1.0) ** -0.5),   # asked for: the Adam rule too
])
def test_initial_spread_follows_the_data_and_the_prior(kw, expected):
    model = torch.nn.Linear(3, 2)
    opt = make(model, **kw)
    assert opt.param_groups[0]["init_std"] == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(opt.posterior_std(model.weight), torch.full((2, 3), expected))
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    std = opt.posterior_std(model.bias)
    assert bool(((std / expected).log().abs() < 0.5).all())


def _layers(count):
    """``count`` weight matrices with their biases, and a LayerNorm: ``count`` weight tensors."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(count)), torch.nn.LayerNorm(4))


def _fine_tune_std(h0, n=500):
    return (n * h0 + 1.0) ** -0.5


@pytest.mark.parametrize("count, h0", [(1, 1.0), (5, 1.0), (17, 3.4), (28, 5.6), (50, 10.0)])
def test_a_fine_tunes_default_start_follows_how_many_weight_tensors_it_trains(count, h0):
    # h0 = 0.2 per weight tensor, at least 1: the starts that worked on fine-tunes of 5, 17, 28 and
    # 50 weight tensors (docs/benchmarks.md, "A fine-tune's default start")
    model = _layers(count)
    opt = make(model, prior_mean="init")
    assert opt.param_groups[0]["init_curvature"] == pytest.approx(h0, rel=1e-12)
    for p in model.parameters():   # biases and gains too: the start is one per group
        torch.testing.assert_close(opt.posterior_std(p), torch.full_like(p, _fine_tune_std(h0)))


def test_the_fine_tune_start_counts_every_group_and_only_trained_weight_tensors():
    model = _layers(10)                                           # h0 = 2
    params = list(model.parameters())
    matrices, rest = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    groupings = {"one": params,
                 "decay / no decay": [{"params": matrices}, {"params": rest, "prior_precision": 0.5}],
                 "one per tensor (layer-wise lr)": [{"params": [p], "lr": 0.01 * (i + 1)}
                                                    for i, p in enumerate(params)]}
    for name, groups in groupings.items():
        opt = ProxScoreOptimizer(groups, lr=0.05, dataset_size=500, rule="solved", prior_mean="init")
        assert [g["init_curvature"] for g in opt.param_groups] == [pytest.approx(2.0)] * len(opt.param_groups), name
        torch.testing.assert_close(opt.posterior_std(matrices[0]), torch.full((4, 4), _fine_tune_std(2.0)))
    matrices[0].requires_grad_(False)                             # frozen: not trained, not counted
    assert make(model, prior_mean="init").param_groups[0]["init_curvature"] == pytest.approx(1.8)


def test_a_group_added_later_counts_every_group_and_leaves_the_others():
    model = _layers(10)
    first, second = list(model[:5].parameters()), list(model[5:].parameters())
    opt = ProxScoreOptimizer(first, lr=0.05, dataset_size=500, rule="solved", prior_mean="init")
    assert opt.param_groups[0]["init_curvature"] == pytest.approx(1.0)
    opt.add_param_group({"params": second})
    assert [g["init_curvature"] for g in opt.param_groups] == [pytest.approx(1.0), pytest.approx(2.0)]
    torch.testing.assert_close(opt.posterior_std(second[0]), torch.full((4, 4), _fine_tune_std(2.0)))
    with pytest.raises(ValueError, match="init_curvature"):       # a start the state cannot hold: refused, unchanged
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, 3))], "prior_precision": 1e-30,
                             "dataset_size": 1e-30})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("kw, h0, std", [
    ({}, 5.0, _fine_tune_std(5.0)),                                              # from scratch: the fixed start
    ({"prior_mean": "init", "init_curvature": 25.0}, 25.0, _fine_tune_std(25.0)),  # asked for
    ({"prior_mean": "init", "init_std": 0.01}, 2.0, 0.01),                       # init_std wins, h0 still reported
    ({"prior_mean": "init", "rule": "proximal"}, None, 1e-3),                    # the Adam rule: unchanged
])
def test_the_fine_tune_start_applies_only_where_nothing_was_asked(kw, h0, std):
    model = _layers(10)
    opt = make(model, **kw)
    group = opt.param_groups[0]
    assert group["init_curvature"] == (None if h0 is None else pytest.approx(h0))
    assert group["init_std"] == pytest.approx(std, rel=1e-12)


def _fine_tune_model(dtype=torch.float32):
    """Two weight matrices of different scales (0.5 and 0.02 per weight), a bias and a norm gain."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.LayerNorm(30), torch.nn.Linear(30, 3)).to(dtype)
    with torch.no_grad():
        model[0].weight.normal_(0, 0.5)
        model[2].weight.normal_(0, 0.02)
    return model


def _relative_start(w, n, kappa, temperature=1.0, prior_precision=1.0):
    mean_square = w.detach().double().pow(2).mean().item()
    return (n * kappa / (temperature * mean_square) + prior_precision) ** -0.5


#: the value measured on the two fine-tunes of docs/benchmarks.md where the start helped
KAPPA = 0.0025


@pytest.mark.parametrize("kw, kappa", [
    ({"prior_mean": "init", "relative_init_curvature": KAPPA}, KAPPA),
    ({"prior_mean": "init", "relative_init_curvature": 0.01, "temperature": 0.5, "prior_precision": 4.0}, 0.01),
    ({"relative_init_curvature": 0.0, "prior_precision": 4.0}, 0.0),      # asked for: from scratch too; 0: the prior
    ({"rule": "proximal", "relative_init_curvature": 0.01}, 0.01),        # and with the Adam rule
])
def test_weight_tensors_start_relative_to_their_own_scale(kw, kappa):
    # sigma_0 = (N kappa / (T r^2) + lambda_0)^(-1/2) for each tensor of >= 2 dimensions (r: its RMS
    # at the start), so a tensor 25x larger starts about 25x wider; biases and gains keep init_std
    model = _fine_tune_model()
    opt = make(model, **kw)
    group = opt.param_groups[0]
    assert group["relative_init_curvature"] == kappa
    n, temperature, prior_precision = 500, group["temperature"], group["prior_precision"]
    expected = {model[0].weight: _relative_start(model[0].weight, n, kappa, temperature, prior_precision),
                model[2].weight: _relative_start(model[2].weight, n, kappa, temperature, prior_precision)}
    before = {p: opt.posterior_std(p) for p in model.parameters()}          # what the first step will start from
    weights = {p: p.detach().clone() for p in model.parameters()}
    opt.zero_grad()
    model(torch.randn(4, 20)).sum().backward()
    opt.step()
    for p in model.parameters():
        start = expected.get(p, group["init_std"])
        torch.testing.assert_close(before[p], torch.full(p.shape, start), rtol=1e-6, atol=0)
        state = {}
        opt._family(group).init_state(state, weights[p], group)     # what the step's own start was
        torch.testing.assert_close(state["log_scale"].exp(), torch.full(p.shape, start), rtol=1e-6, atol=0)
        assert bool(((opt.state[p]["log_scale"].exp() / start).log().abs() < 0.5).all())   # one step from there
    if kappa > 0:
        assert expected[model[0].weight] > 10 * expected[model[2].weight]


@pytest.mark.parametrize("kw", [
    {},
    {"prior_mean": "init"},     # off in a fine-tune too: it wrecked a whole-network BatchNorm fine-tune
    {"prior_mean": "init", "rule": "proximal"},
])
def test_the_relative_start_is_off_unless_asked(kw):
    model = _fine_tune_model()
    opt = make(model, **kw)
    group = opt.param_groups[0]
    assert group["relative_init_curvature"] is None
    torch.testing.assert_close(opt.posterior_std(model[0].weight), torch.full((30, 20), group["init_std"]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_relative_start_at_the_edges(dtype):
    model = _fine_tune_model(dtype)
    with torch.no_grad():
        model[2].weight.zero_()                       # no scale to be relative to: init_std
        model[0].weight.mul_(1e-30 if dtype == torch.float64 else 1.0)
    opt = make(model, prior_mean="init", relative_init_curvature=KAPPA)
    group = opt.param_groups[0]
    opt.zero_grad()
    model(torch.randn(4, 20, dtype=dtype)).sum().backward()
    opt.step()
    low, _ = kernel_gaussian.STD_RANGE
    zero_start = opt.state[model[2].weight]["log_scale"].exp()
    assert bool(((zero_start / group["init_std"]).log().abs() < 0.5).all())
    start = opt.state[model[0].weight]["log_scale"].exp()
    assert opt.state[model[0].weight]["log_scale"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype == torch.float64:                        # r = 5e-31: clamped to the narrowest std the state holds
        assert bool((start >= low).all()) and bool((start < 1e3 * low).all())
    else:
        expected = _relative_start(model[0].weight, 500, KAPPA)
        assert bool(((start / expected).log().abs() < 0.5).all())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("kw, expected", [
    ({}, newton.SCALE_LR_RATIO),                    # the solved rule averages over 1/(0.3 lr) steps
    ({"scale_lr_ratio": 1.0}, 1.0),
    ({"rule": "proximal"}, 1.0),
])
def test_the_precisions_trust_fraction_defaults_to_a_third_of_lr(kw, expected):
    model = torch.nn.Linear(3, 2)
    opt = make(model, **kw)
    assert opt.param_groups[0]["scale_lr_ratio"] == expected
    assert newton.SCALE_LR_RATIO == 0.3


@pytest.mark.parametrize("mean_update, names", [
    ("newton", {"mean", "log_scale", "mean_exp_avg"}),
    ("score", {"mean", "log_scale", "mean_exp_avg", "mean_exp_avg_sq"}),
])
def test_state_is_the_mean_the_scale_and_one_average(mean_update, names):
    model = torch.nn.Linear(3, 2)
    opt = make(model, mean_update=mean_update)
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = opt.state[model.weight]
    assert {k for k, v in state.items() if v.shape == model.weight.shape} == names


@pytest.mark.parametrize("kw, match", [
    ({"mean_update": "residual"}, "mean_update"),
    ({"rule": "proximal", "mean_update": "newton"}, "mean_update"),
    ({"init_curvature": -1.0}, "init_curvature"),
    ({"init_curvature": float("nan")}, "init_curvature"),
    ({"init_curvature": True}, "init_curvature"),
    ({"init_curvature": 0.0, "prior_precision": 1e-30}, "init_curvature"),   # sigma_0 = 1e15: too wide to keep
    ({"init_curvature": 1e300}, "init_curvature"),                          # sigma_0 = 1e-151: too narrow
    ({"relative_init_curvature": -1.0}, "relative_init_curvature"),
    ({"relative_init_curvature": float("inf")}, "relative_init_curvature"),
    ({"relative_init_curvature": True}, "relative_init_curvature"),
    ({"inner_steps": 3}, "inner_steps"),           # the step counter would run 3x ahead of the bias correction
])
def test_bad_solved_options_are_refused_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        make(torch.nn.Linear(3, 2), **kw)


def test_an_adam_sized_lr_with_the_newton_mean_warns():
    model = torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="fraction of the Newton step"):
        make(model, mean_update="newton", lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(model, mean_update="newton", lr=0.1)
        make(model, mean_update="score", lr=1e-3)


def fit_solved_blr(mean_update, *, batch_size, steps, lr, decay, seed=0):
    problem = linear_regression()

    def build(params, n):
        return ProxScoreOptimizer(params, lr=lr, dataset_size=n, rule="solved", mean_update=mean_update,
                                  prior_precision=problem.prior_precision)

    return fit_linear_regression(build, problem, batch_size=batch_size, steps=steps, decay=decay, seed=seed,
                                 use_closure=True)[2]


def test_blr_full_batch_newton_recovers_optimal_mean_field():
    # The posterior-quality benchmark's setting at a test's budget: KL from ~1e3 at the start.
    # Seeds 0-9 at 3000 steps end at KL <= 0.0080 from the default start h0 = 5 (<= 0.0082 from
    # h0 = 1); the bound 0.05 is the
    # Adam rule's own full-batch bound (tests/test_inference.py), reached here in a quarter of its
    # steps. A precision update with its sign flipped, or the mean step without the variance, fails.
    kl = fit_solved_blr("newton", batch_size=200, steps=3000, lr=0.03, decay=300)
    assert kl <= 0.05, kl


def test_blr_full_batch_adam_mean_recovers_optimal_mean_field():
    # Adam on the mean converges as the Adam rule does (its test's 12000 steps); seeds 0-9 end at
    # KL <= 0.040 from h0 = 5 and from h0 = 1, the bound is twice that.
    kl = fit_solved_blr("score", batch_size=200, steps=12000, lr=1e-2, decay=500)
    assert kl <= 0.08, kl
