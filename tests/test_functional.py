"""The update math: the foreach version against the single-tensor reference, and the reference
against the closed-form gradient of the proximal objective."""

import itertools

import pytest
import torch

from torch_proxvi import _functional as F

SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4)]


def random_inputs(seed, steps=0.0):
    g = torch.Generator().manual_seed(seed)

    def r(shape, scale=1.0):
        return scale * torch.randn(shape, generator=g, dtype=torch.float64)

    tensors = dict(means=[], log_scales=[], stats=[], mean_avgs=[], mean_avg_sqs=[],
                   scale_avgs=[], scale_avg_sqs=[], steps=[])
    for shape in SHAPES:
        log_scale = r(shape, 0.5) - 2.0
        u = r(shape) * log_scale.exp()
        s = r(shape, 30.0)
        tensors["means"].append(r(shape))
        tensors["log_scales"].append(log_scale)
        tensors["stats"].append(F.ScoreStats(u, u * u + r(shape).abs() * 1e-3, s, u * s))
        tensors["mean_avgs"].append(r(shape))
        tensors["mean_avg_sqs"].append(r(shape).abs())
        tensors["scale_avgs"].append(r(shape))
        tensors["scale_avg_sqs"].append(r(shape).abs())
        tensors["steps"].append(torch.tensor(steps))
    return tensors


CONFIGS = list(itertools.product([1, 3], ["score", "residual"], [True, False], [0.0, 2.0], [0.0, 5.0]))


@pytest.mark.parametrize("inner_steps,mean_update,update_scale,prox_weight,steps", CONFIGS)
def test_foreach_matches_single_tensor_in_float64(inner_steps, mean_update, update_scale,
                                                  prox_weight, steps):
    results = []
    for foreach in (False, True):
        t = random_inputs(seed=0, steps=steps)
        F.gaussian_update(**t, lr=1e-2, scale_lr=3e-3, betas=(0.9, 0.99), eps=1e-8,
                          inner_steps=inner_steps, prox_weight=prox_weight,
                          mean_update=mean_update, update_scale=update_scale, foreach=foreach)
        results.append(t)
    single, multi = results
    for key in ("means", "log_scales", "mean_avgs", "mean_avg_sqs", "scale_avgs",
                "scale_avg_sqs", "steps"):
        for a, b in zip(single[key], multi[key]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=key)
    # the step moved the mean, and the log-scale exactly when asked to
    ref = random_inputs(seed=0, steps=steps)
    assert not torch.equal(single["means"][2], ref["means"][2])
    assert torch.equal(single["log_scales"][2], ref["log_scales"][2]) != update_scale
    assert float(single["steps"][0]) == steps + inner_steps


def proximal_objective(mean, log_scale, mean_t, log_scale_t, thetas, scores, prox_weight):
    """(1/K) sum_k ||sigma_t (grad log q(theta_k) - s_k)||^2 + prox * KL(q || q_t), summed."""
    var, var_t = torch.exp(2 * log_scale), torch.exp(2 * log_scale_t)
    residual = -(thetas - mean) / var - scores
    fit = (var_t * residual**2).mean(0).sum()
    kl = (log_scale_t - log_scale + (var + (mean - mean_t) ** 2) / (2 * var_t) - 0.5).sum()
    return fit + prox_weight * kl


@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_residual_gradients_match_autograd_of_the_objective(delta):
    g = torch.Generator().manual_seed(1)
    k, shape = 4, (6,)
    mean_t = torch.randn(shape, generator=g, dtype=torch.float64)
    log_scale_t = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3 - 1
    thetas = mean_t + log_scale_t.exp() * torch.randn((k, *shape), generator=g, dtype=torch.float64)
    scores = torch.randn((k, *shape), generator=g, dtype=torch.float64) * 5
    stats = F.ScoreStats.zeros_like(mean_t)
    for theta, s in zip(thetas, scores):
        F.accumulate_stats(stats, theta - mean_t, s, 1.0 / k)
    # at q_t (delta = 0) and at a point away from it, as in later inner steps
    mean = (mean_t + delta).requires_grad_()
    log_scale = (log_scale_t - delta).requires_grad_()
    proximal_objective(mean, log_scale, mean_t, log_scale_t, thetas, scores, 0.7).backward()
    grad_m, grad_rho = F.proximal_gradients(
        mean.detach(), log_scale.detach(), mean_t, torch.exp(2 * log_scale_t), stats,
        prox_weight=0.7, mean_update="residual")
    torch.testing.assert_close(grad_m, mean.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_rho, log_scale.grad, rtol=1e-10, atol=1e-10)


def test_score_mean_update_drops_only_the_control_variate():
    g = torch.Generator().manual_seed(2)
    u, s = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g) * 3
    stats = F.ScoreStats(u, u * u, s.double(), u * s)
    mean, log_scale = torch.zeros(5, dtype=torch.float64), torch.full((5,), -1.0, dtype=torch.float64)
    var = torch.exp(2 * log_scale)
    kw = dict(prox_weight=1.0)
    res_m, res_rho = F.proximal_gradients(mean, log_scale, mean, var, stats, mean_update="residual", **kw)
    sc_m, sc_rho = F.proximal_gradients(mean, log_scale, mean, var, stats, mean_update="score", **kw)
    torch.testing.assert_close(res_m - sc_m, -2 * u / var)   # the control variate -u / sigma^2
    torch.testing.assert_close(res_rho, sc_rho)               # the scale update is shared


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-15), (torch.float32, 1e-6)])
@pytest.mark.parametrize("first_moments", [True, False])
def test_fused_adam_equals_foreach_adam(dtype, tol, first_moments):
    # On the CPU fused_adam runs torch's fused Adam kernel; it must do what foreach_adam's seven
    # passes do (to rounding), with first moments and without (beta1 = 0, the gradient standing
    # in for them), and leave the gradients' values alone.
    g = torch.Generator().manual_seed(0)
    shapes = [(30, 7), (5,), (4096,)]

    def tensors(positive=False):
        out = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
        return [t.abs() for t in out] if positive else out

    params, grads, exp_avgs, exp_avg_sqs = tensors(), tensors(), tensors(), tensors(positive=True)
    # a transposed weight with a gradient laid out row by row: torch's kernel walks memory, not
    # indices, so it must not be given tensors whose layouts differ
    params[0] = params[0].t().contiguous().t()
    beta1 = 0.9 if first_moments else 0.0
    runs = []
    for fn in (F.fused_adam, F.foreach_adam):
        copies = [[t.clone(memory_format=torch.preserve_format) for t in ts]
                  for ts in (params, grads, exp_avgs, exp_avg_sqs)]
        for _ in range(3):
            fn(copies[0], copies[1], copies[2] if first_moments else None, copies[3], 7, 1e-2, beta1, 0.999, 1e-8)
        runs.append(copies)
    for fused, reference in zip(*runs):
        for a, b in zip(fused, reference):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], grads))
    assert not torch.equal(runs[0][0][0], params[0])
