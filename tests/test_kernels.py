"""The kernels' math against independent ground truth, in float64.

Each rule of :mod:`torch_proxvi.kernels.gaussian` is checked against autograd of the objective it
claims to minimise, stepped by ``torch.optim.Adam`` (not by the package's Adam); the score against
autograd of the tempered log posterior; the package's Adam against torch's. Every path of the
dispatcher calls these functions (tests/test_paths.py checks that they give the same numbers).
"""

from __future__ import annotations

import math

import pytest
import torch

from torch_proxvi.kernels import ScoreStats, StepHyper, accumulate, gaussian, one_sample, score
from torch_proxvi.kernels.adam import adam
from torch_proxvi.kernels.noise import hash_normal, stream_keys

F64 = torch.float64
N, T, PRIOR, LR = 40.0, 0.5, 0.7, 0.05


def hyper(**kw) -> StepHyper:
    base = dict(lr=LR, scale_lr=2 * LR, beta1=0.9, beta2=0.999, eps=1e-8, score_scale=-N / T,
                prior_precision=PRIOR, prox_weight=0.8, step=0.0)
    return StepHyper(**{**base, **kw})


def loss(theta):
    """A mean mini-batch loss of a non-quadratic model (its score is not linear in theta)."""
    return (torch.log1p(torch.exp(theta - 0.3)) + 0.2 * theta**2).sum()


def log_posterior(theta, prior_mean):
    """The tempered log posterior whose score kernels.score estimates: -(N/T) L - prior term."""
    return -N / T * loss(theta) - PRIOR / 2 * ((theta - prior_mean) ** 2).sum()


def draws(k=4, shape=(6,), seed=1, prior_mean=False):
    """A state at q_t, K samples of it, their gradients and scores."""
    g = torch.Generator().manual_seed(seed)
    mean_t = torch.randn(shape, generator=g, dtype=F64)
    log_scale_t = torch.randn(shape, generator=g, dtype=F64) * 0.3 - 1
    thetas = mean_t + log_scale_t.exp() * torch.randn((k, *shape), generator=g, dtype=F64)
    mu0 = torch.randn(shape, generator=g, dtype=F64) if prior_mean else None
    grads = [torch.func.grad(loss)(theta) for theta in thetas]
    return mean_t, log_scale_t, thetas, grads, mu0


def test_score_is_the_gradient_of_the_tempered_log_posterior():
    # a temperature != 1 and a prior mean != 0: an inverted temperature or a dropped prior fails
    mean_t, _, thetas, grads, mu0 = draws(prior_mean=True)
    for theta, grad in zip(thetas, grads):
        expected = torch.func.grad(log_posterior)(theta, mu0)
        torch.testing.assert_close(score(grad, theta, mu0, hyper()), expected, rtol=1e-12, atol=1e-12)
    expected = torch.func.grad(log_posterior)(thetas[0], torch.zeros_like(mean_t))
    torch.testing.assert_close(score(grads[0], thetas[0], None, hyper()), expected, rtol=1e-12, atol=1e-12)


def stats_of(mean_t, thetas, grads, mu0, h):
    stats = ScoreStats.zeros_like(mean_t)
    for theta, grad in zip(thetas, grads):
        accumulate(stats, theta - mean_t, score(grad, theta, mu0, h), 1.0 / len(thetas))
    return stats


def test_statistics_are_the_averages_over_the_samples():
    mean_t, _, thetas, grads, mu0 = draws(k=5, prior_mean=True)
    h = hyper()
    stats = stats_of(mean_t, thetas, grads, mu0, h)
    u = thetas - mean_t
    s = torch.stack([score(g, t, mu0, h) for t, g in zip(thetas, grads)])
    for got, want in zip(stats, (u.mean(0), (u * u).mean(0), s.mean(0), (u * s).mean(0))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(one_sample(u[0], s[0]), (u[0], u[0] ** 2, s[0], u[0] * s[0])):
        torch.testing.assert_close(got, want)


def proximal_objective(mean, log_scale, mean_t, log_scale_t, thetas, scores, prox_weight):
    """(1/K) sum_k ||sigma_t (grad log q(theta_k) - s_k)||^2 + prox * KL(q || q_t), summed."""
    var, var_t = torch.exp(2 * log_scale), torch.exp(2 * log_scale_t)
    residual = -(thetas - mean) / var - scores
    fit = (var_t * residual**2).mean(0).sum()
    kl = (log_scale_t - log_scale + (var + (mean - mean_t) ** 2) / (2 * var_t) - 0.5).sum()
    return fit + prox_weight * kl


def negative_elbo(mean, log_scale, eps, mu0):
    """-(1/K) sum_k log lik(m + sigma eps_k) + KL(q || prior), the prior's KL analytic."""
    theta = mean + log_scale.exp() * eps
    nll = sum(N / T * loss(t) for t in theta) / len(theta)
    var = torch.exp(2 * log_scale)
    kl = 0.5 * (PRIOR * var + PRIOR * (mean - mu0) ** 2 - 1 - torch.log(PRIOR * var)).sum()
    return nll + kl


def oracle_gradients(rule, mean_update, mean, log_scale, mean_t, log_scale_t, thetas, scores, h, mu0):
    """Autograd of the rule's objective at (mean, log_scale); with ``mean_update="score"`` the mean
    follows -2<s> + prox * dKL/dm (the fit's control variate dropped)."""
    m, r = mean.clone().requires_grad_(), log_scale.clone().requires_grad_()
    if rule == "elbo":
        eps = (thetas - mean_t) / log_scale_t.exp()
        negative_elbo(m, r, eps, torch.zeros_like(m) if mu0 is None else mu0).backward()
        return m.grad, r.grad
    proximal_objective(m, r, mean_t, log_scale_t, thetas, scores, h.prox_weight).backward()
    if mean_update == "residual":
        return m.grad, r.grad
    m2 = mean.clone().requires_grad_()
    var_t = torch.exp(2 * log_scale_t)
    (-2 * scores.mean(0) * m2 + h.prox_weight * ((m2 - mean_t) ** 2 / (2 * var_t))).sum().backward()
    return m2.grad, r.grad


CASES = [  # rule, mean_update, inner_steps, betas, prior mean, warm-up (scale frozen)
    ("proximal", "residual", 1, (0.9, 0.999), False, False),
    ("proximal", "residual", 3, (0.9, 0.999), True, False),
    ("proximal", "score", 1, (0.0, 0.99), True, False),
    ("proximal", "score", 3, (0.9, 0.999), False, False),
    ("proximal", "residual", 2, (0.9, 0.999), False, True),
    ("elbo", "score", 1, (0.9, 0.999), True, False),
    ("elbo", "score", 1, (0.0, 0.99), False, False),
]


@pytest.mark.parametrize("rule, mean_update, inner_steps, betas, prior_mean, warmup", CASES)
def test_update_is_adam_on_autograd_gradients_of_the_rule_objective(rule, mean_update, inner_steps, betas,
                                                                     prior_mean, warmup):
    mean_t, log_scale_t, thetas, grads, mu0 = draws(prior_mean=prior_mean)
    h = hyper(rule=rule, mean_update=mean_update, inner_steps=inner_steps, beta1=betas[0], beta2=betas[1],
              update_scale=not warmup, step=3.0)
    stats = stats_of(mean_t, thetas, grads, mu0, h)
    scores = torch.stack([score(g, t, mu0, h) for t, g in zip(thetas, grads)])

    # the oracle: torch.optim.Adam on autograd gradients, from the same moments (3 earlier steps)
    g = torch.Generator().manual_seed(5)
    moments = {k: torch.rand(mean_t.shape, generator=g, dtype=F64) * 1e-2 for k in ("m1", "m2", "r1", "r2")}
    mean, log_scale = mean_t.clone(), log_scale_t.clone()
    opt_m = torch.optim.Adam([mean], lr=h.lr, betas=betas, eps=h.eps, foreach=False)
    opt_r = torch.optim.Adam([log_scale], lr=h.scale_lr, betas=betas, eps=h.eps, foreach=False)
    for opt, p, (first, second) in ((opt_m, mean, ("m1", "m2")), (opt_r, log_scale, ("r1", "r2"))):
        opt.state[p] = {"step": torch.tensor(3.0, dtype=F64), "exp_avg": moments[first].clone(),
                        "exp_avg_sq": moments[second].clone()}
    for _ in range(inner_steps):
        grad_m, grad_r = oracle_gradients(rule, mean_update, mean, log_scale, mean_t, log_scale_t, thetas, scores,
                                          h, mu0)
        mean.grad, log_scale.grad = grad_m, grad_r
        opt_m.step()
        if not warmup:
            opt_r.step()

    state = {"mean": mean_t.clone(), "log_scale": log_scale_t.clone(),
             "mean_exp_avg_sq": moments["m2"].clone(), "log_scale_exp_avg_sq": moments["r2"].clone()}
    if betas[0] > 0:
        state.update(mean_exp_avg=moments["m1"].clone(), log_scale_exp_avg=moments["r1"].clone())
    if mu0 is not None:
        state["prior_mean"] = mu0
    gaussian.update(state, stats, h)
    torch.testing.assert_close(state["mean"], mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["log_scale"], log_scale, rtol=1e-10, atol=1e-12)
    assert torch.equal(state["log_scale"], log_scale_t) == warmup      # frozen exactly in warm-up
    if betas[0] > 0:                                                     # torch keeps its moments too
        torch.testing.assert_close(state["mean_exp_avg"], opt_m.state[mean]["exp_avg"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(state["mean_exp_avg_sq"], opt_m.state[mean]["exp_avg_sq"], rtol=1e-10, atol=1e-14)


def test_score_mean_update_drops_only_the_control_variate():
    g = torch.Generator().manual_seed(2)
    u, s = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64) * 3
    state = {"mean": torch.zeros(5, dtype=F64), "log_scale": torch.full((5,), -1.0, dtype=F64)}
    var = torch.exp(2 * state["log_scale"])
    stats = one_sample(u, s)
    res = gaussian.proximal_gradients(state, stats, var, None, hyper(mean_update="residual"))
    sc = gaussian.proximal_gradients(state, stats, var, None, hyper(mean_update="score"))
    torch.testing.assert_close(res[0] - sc[0], -2 * u / var)   # the control variate -u / sigma^2
    torch.testing.assert_close(res[1], sc[1])                   # the scale update is shared


def test_log_scale_is_kept_within_its_float32_range():
    state = {"mean": torch.zeros(3, dtype=F64), "log_scale": torch.tensor([19.99, 0.0, -29.99], dtype=F64),
             "mean_exp_avg_sq": torch.zeros(3, dtype=F64), "log_scale_exp_avg_sq": torch.zeros(3, dtype=F64)}
    stats = one_sample(torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64))
    stats = stats._replace(u_score_mean=torch.tensor([1e6, 0.0, -1e6], dtype=F64))
    gaussian.update(state, stats, hyper(scale_lr=1.0, beta1=0.0))
    assert float(state["log_scale"][0]) == gaussian.LOG_SCALE_MAX
    assert float(state["log_scale"][2]) == gaussian.LOG_SCALE_MIN


def test_sample_mean_and_std_of_the_state():
    state = {"mean": torch.tensor([1.0, -2.0], dtype=F64), "log_scale": torch.tensor([0.0, math.log(3)], dtype=F64)}
    noise = torch.tensor([0.5, -1.0], dtype=F64)
    torch.testing.assert_close(gaussian.sample(state, noise), torch.tensor([1.5, -5.0], dtype=F64))
    torch.testing.assert_close(gaussian.std(state), torch.tensor([1.0, 3.0], dtype=F64))


@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_adam_is_torchs_adam(beta1):
    g = torch.Generator().manual_seed(3)
    param, ref = torch.randn(50, generator=g, dtype=F64), None
    ref = param.clone()
    opt = torch.optim.Adam([ref], lr=0.01, betas=(beta1, 0.99), eps=1e-6, foreach=False)
    exp_avg = None if beta1 == 0 else torch.zeros_like(param)
    exp_avg_sq = torch.zeros_like(param)
    for step in range(1, 6):
        grad = torch.randn(50, generator=g, dtype=F64) * 10**step
        ref.grad = grad
        opt.step()
        adam(param, grad, exp_avg, exp_avg_sq, lr=0.01, step=step, beta1=beta1, beta2=0.99, eps=1e-6)
        torch.testing.assert_close(param, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("compiling", [False, True])
def test_adam_bounds_its_gradient_the_same_way_in_both_forms(monkeypatch, compiling):
    """Adam clamps |g| to sqrt(max)/2 and takes a NaN as 0, so its moments stay finite; the
    compiled kernel's form (torch.where) and the eager one (clamp, nan_to_num) agree."""
    from torch_proxvi.kernels.adam import grad_limit

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    limit = grad_limit(torch.float32)
    grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -1e20, 2.0, 0.0])
    param, exp_avg, exp_avg_sq = torch.zeros(7), torch.zeros(7), torch.zeros(7)
    adam(param, grad, exp_avg, exp_avg_sq, lr=0.1, step=1, beta1=0.9, beta2=0.999, eps=1e-8)
    bounded = torch.tensor([0.0, limit, -limit, limit, -limit, 2.0, 0.0])
    torch.testing.assert_close(exp_avg, 0.1 * bounded)
    torch.testing.assert_close(exp_avg_sq, 0.001 * bounded * bounded)
    assert exp_avg_sq.isfinite().all() and param.isfinite().all()
    assert param[0] == 0 and param[1] < 0 < param[2]


def test_hyper_round_trips_through_the_compiled_kernels_numbers():
    h = hyper(rule="elbo", mean_update="residual", inner_steps=2, update_scale=False, step=7.0)
    back = StepHyper.from_numbers(h.numbers(F64, "cpu"), h.static())
    assert [float(v) for v in back[:len(h.numbers(F64, "cpu"))]] == list(h[:len(h.numbers(F64, "cpu"))])
    assert back.static() == h.static()


def test_hyper_of_a_group_follows_the_group():
    group = dict(lr=0.1, scale_lr_ratio=0.5, betas=(0.8, 0.9), eps=1e-6, dataset_size=100, temperature=4.0,
                 prior_precision=2.0, prox_weight=1.5, mean_update="residual", inner_steps=2, warmup_steps=3,
                 rule="elbo")
    h = StepHyper.of(group, 4.0)                       # 4 Adam steps = 2 optimizer steps: in warm-up
    assert (h.lr, h.scale_lr, h.beta1, h.beta2, h.score_scale) == (0.1, 0.05, 0.8, 0.9, -25.0)
    assert (h.rule, h.mean_update, h.inner_steps, h.update_scale) == ("elbo", "residual", 2, False)
    assert StepHyper.of(group, 6.0).update_scale      # the 4th optimizer step updates the scale


def test_hash_normal_is_standard_normal_and_independent_across_seeds():
    z = hash_normal(torch.tensor(12345), 400_000, F64, "cpu")
    w = hash_normal(torch.tensor(12346), 400_000, F64, "cpu")
    # 4e5 draws: standard errors 0.0016 (mean), 0.0022 (variance), 0.0077 (4th moment 3),
    # 0.0016 (correlation); the margins are 5 of them
    assert abs(float(z.mean())) < 0.008 and abs(float(z.var()) - 1) < 0.011
    assert abs(float((z**4).mean()) - 3) < 0.04
    assert abs(float(torch.corrcoef(torch.stack([z, w]))[0, 1])) < 0.008
    assert abs(float(torch.corrcoef(torch.stack([z[1:], z[:-1]]))[0, 1])) < 0.008
    # tails: P(|z| > 3) = 0.0027
    assert abs(float((z.abs() > 3).double().mean()) - 0.0027) < 5 * (0.0027 / 4e5) ** 0.5


def test_stream_keys_continue_one_stream_at_any_offset():
    seed = torch.tensor(987654321)
    whole = hash_normal(stream_keys(seed, torch.tensor([0]))[0], 1000, F64, "cpu")
    tail = hash_normal(stream_keys(seed, torch.tensor([600]))[0], 400, F64, "cpu")
    assert torch.equal(whole[600:], tail)
