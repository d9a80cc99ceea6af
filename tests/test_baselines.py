"""What is special to GSM and BaM: their published updates on Gaussian targets whose answer is
known, the dense covariance, and its errors (the generic contract runs in test_contract.py for
the diagonal versions)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from torch_proxvi import GSM, BaM
from torch_proxvi.baselines.bam import bam_dense_update, bam_diagonal_update
from torch_proxvi.baselines.gsm import gsm_dense_update, gsm_diagonal_update
from torch_proxvi.reference.testing import linear_regression

F64 = torch.float64
DENSE = {"gsm": gsm_dense_update, "bam": bam_dense_update}
DIAGONAL = {"gsm": gsm_diagonal_update, "bam": bam_diagonal_update}


def gaussian_target(d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    cov = a @ a.T + 0.5 * torch.eye(d, dtype=F64)
    return torch.randn(d, generator=g, dtype=F64), cov


def exact_moment_batch(mean, cov, k, seed=1):
    """k samples whose empirical mean and (biased) covariance are exactly ``mean`` and ``cov``."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(k, len(mean), generator=g, dtype=F64)
    e = e - e.mean(0)
    e = e @ torch.linalg.inv(torch.linalg.cholesky(e.T @ e / k)).T     # whitened: <e e^T> = I
    return mean + e @ torch.linalg.cholesky(cov).T


def gaussian_kl(mean, cov, target_mean, target_cov):
    prec = torch.linalg.inv(target_cov)
    diff = mean - target_mean
    return float(0.5 * (torch.trace(prec @ cov) + diff @ prec @ diff - len(mean)
                        + torch.logdet(target_cov) - torch.logdet(cov)))


# ---------------------------------------------------------------------------- fixed points
def test_gsm_leaves_the_target_unchanged_whatever_the_samples():
    # At q = p every point already satisfies grad log q = grad log p: the KL-closest such
    # Gaussian is q itself, for any sample, so the update is the identity (up to rounding).
    mean, cov = gaussian_target()
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=F64) * 3
    score = -(z - mean) @ torch.linalg.inv(cov)
    new_mean, new_cov = gsm_dense_update(mean, cov, z, score)
    torch.testing.assert_close(new_mean, mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(new_cov, cov, rtol=0, atol=1e-10)
    var = torch.diagonal(cov)
    s = -(z - mean) / var
    new_mean, new_var = gsm_diagonal_update(mean, var, z, s)
    torch.testing.assert_close(new_mean, mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(new_var, var, rtol=0, atol=1e-10)


@pytest.mark.parametrize("lr", [0.3, 1.0, 25.0])
def test_bam_fixed_point_is_the_target_for_a_batch_with_the_target_moments(lr):
    # With z_bar = mu, C = Sigma, g_bar = 0 and Gamma = Sigma^-1 (what an infinite batch from
    # q = p gives), U V = lambda (1 + lambda) I and the update returns (mu, Sigma) exactly.
    mean, cov = gaussian_target()
    z = exact_moment_batch(mean, cov, k=9)
    score = -(z - mean) @ torch.linalg.inv(cov)
    new_mean, new_cov = bam_dense_update(mean, cov, z, score, lr)
    torch.testing.assert_close(new_mean, mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(new_cov, cov, rtol=1e-9, atol=1e-9)
    var = torch.diagonal(cov)
    zd = exact_moment_batch(mean, torch.diag(var), k=9)
    new_mean, new_var = bam_diagonal_update(mean, var, zd, -(zd - mean) / var, lr)
    torch.testing.assert_close(new_mean, mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(new_var, var, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["gsm", "bam"])
def test_dense_update_converges_to_a_gaussian_target(name):
    # From N(0, 0.01 I) (KL 10.4), batches of 8, exact scores. Measured KL after 40 steps:
    # GSM 1.2e-6 (0.023 at 20 steps: it converges geometrically), BaM < 1e-14.
    mean_p, cov_p = gaussian_target()
    prec = torch.linalg.inv(cov_p)
    g = torch.Generator().manual_seed(0)
    mean, cov = torch.zeros(4, dtype=F64), 0.01 * torch.eye(4, dtype=F64)
    lr = {"gsm": 1.0, "bam": 10.0}[name]
    start = gaussian_kl(mean, cov, mean_p, cov_p)
    for _ in range(40):
        z = mean + torch.randn(8, 4, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
        mean, cov = DENSE[name](mean, cov, z, -(z - mean_p) @ prec, lr)
    assert start > 10
    assert gaussian_kl(mean, cov, mean_p, cov_p) < 1e-4


@pytest.mark.parametrize("name", ["gsm", "bam"])
def test_diagonal_update_converges_to_an_independent_gaussian_target(name):
    # Independent coordinates: the diagonal update is exact coordinate by coordinate.
    g = torch.Generator().manual_seed(0)
    mean_p = torch.randn(50, generator=g, dtype=F64)
    var_p = torch.exp(torch.randn(50, generator=g, dtype=F64))
    mean, var = torch.zeros(50, dtype=F64), torch.ones(50, dtype=F64)
    lr = {"gsm": 1.0, "bam": 10.0}[name]
    for _ in range(60):
        z = mean + var.sqrt() * torch.randn(4, 50, generator=g, dtype=F64)
        mean, var = DIAGONAL[name](mean, var, z, -(z - mean_p) / var_p, lr)
    kl = 0.5 * (var / var_p + (mean - mean_p) ** 2 / var_p - 1 - torch.log(var / var_p)).sum()
    assert kl < 1e-5, kl


def test_diagonal_update_is_the_dense_update_in_one_dimension():
    g = torch.Generator().manual_seed(4)
    mean, var = torch.randn(1, generator=g, dtype=F64), torch.rand(1, generator=g, dtype=F64) + 0.1
    z, s = torch.randn(3, 1, generator=g, dtype=F64), torch.randn(3, 1, generator=g, dtype=F64)
    for name, lr in (("gsm", 0.7), ("bam", 3.0)):
        m_d, v_d = DIAGONAL[name](mean, var, z, s, lr)
        m_f, c_f = DENSE[name](mean, var.view(1, 1), z, s, lr)
        torch.testing.assert_close(m_d, m_f, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v_d, c_f.view(1), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- the optimizers
def fit_blr_dense(cls, lr, steps=100, k=8, seed=0):
    problem = linear_regression()
    torch.manual_seed(seed)
    model = nn.Linear(5, 1).double()
    opt = cls(model.parameters(), lr=lr, dataset_size=len(problem.x), covariance="dense",
              mc_samples=k, init_std=1.0, prior_precision=problem.prior_precision)

    def closure():
        opt.zero_grad()
        loss = problem.loss(model(problem.x), problem.y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return problem, model, opt, closure


@pytest.mark.parametrize("cls, lr", [(GSM, 1.0), (BaM, 100.0)])
def test_dense_optimizer_recovers_the_exact_blr_posterior(cls, lr):
    # Full-batch scores of a Gaussian posterior: both methods are exact here (the full
    # covariance, not only the mean field). Measured KL: GSM 4e-9, BaM < 1e-14 at 100 steps.
    problem, model, opt, _ = fit_blr_dense(cls, lr)
    design = torch.cat([problem.x, torch.ones(len(problem.x), 1, dtype=F64)], 1)
    prec = design.T @ design / problem.noise_std**2 + problem.prior_precision * torch.eye(6, dtype=F64)
    mean, cov = opt._family(opt.param_groups[0])._joint([opt.state[model.weight], opt.state[model.bias]])
    assert gaussian_kl(mean, cov, problem.mean, torch.linalg.inv(prec)) < 1e-6
    std = torch.cat([opt.posterior_std(p).flatten() for p in (model.weight, model.bias)])
    torch.testing.assert_close(std, torch.linalg.inv(prec).diagonal().sqrt(), rtol=1e-3, atol=0)
    # samples are joint: their correlation matches the posterior's
    with torch.no_grad():
        draws = []
        with opt.sampled_params(torch.Generator().manual_seed(0)) as redraw:
            for _ in range(4000):
                redraw()
                draws.append(torch.cat([model.weight.flatten(), model.bias]))
    emp = torch.cov(torch.stack(draws).T)
    # 4000 draws: each covariance entry has a relative standard error below ~2.3%
    torch.testing.assert_close(emp, torch.linalg.inv(prec), rtol=0, atol=0.1 * float(emp.diag().max()))


@pytest.mark.parametrize("cls", [GSM, BaM])
def test_dense_state_dict_round_trip_continues_exactly(cls):
    _, model, opt, closure = fit_blr_dense(cls, lr=1.0, steps=3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    problem2, model2, opt2, closure2 = fit_blr_dense(cls, lr=1.0, steps=0, seed=5)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for _ in range(3):
        opt.step(closure)
        opt2.step(closure2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["covariance"], opt2.state[q]["covariance"])


def test_dense_state_dict_of_another_group_layout_is_refused():
    _, model, opt, _ = fit_blr_dense(GSM, lr=1.0, steps=1)
    other = nn.Linear(5, 1).double()
    extra = nn.Parameter(torch.zeros(2, dtype=F64))
    opt2 = GSM([*other.parameters(), extra], dataset_size=10, covariance="dense")
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = [0, 1, 2]
    with pytest.raises(ValueError, match="covariance"):
        opt2.load_state_dict(sd)
    assert not opt2.state


# ---------------------------------------------------------------------------- errors
def test_dense_refuses_large_groups_and_names_the_alternative():
    big = nn.Linear(100, 10)   # 1010 numbers
    with pytest.raises(ValueError, match=r"1000 dimensions.*covariance='diagonal'"):
        BaM(big.parameters(), dataset_size=10, covariance="dense")
    # a per-group choice: the small head dense, the body diagonal
    opt = GSM([{"params": big.parameters()},
               {"params": nn.Linear(10, 2).parameters(), "covariance": "dense"}], dataset_size=10)
    assert [g["covariance"] for g in opt.param_groups] == ["diagonal", "dense"]


@pytest.mark.parametrize("kw, name", [({"covariance": "full"}, "covariance"), ({"lr": 1.5}, "learning rate")])
def test_bad_options(kw, name):
    with pytest.raises(ValueError, match=name):
        GSM(nn.Linear(2, 1).parameters(), dataset_size=10, **kw)


def test_dense_group_needs_every_gradient():
    model = nn.Linear(3, 1)
    opt = BaM(model.parameters(), dataset_size=10, covariance="dense")
    model.weight.grad = torch.ones_like(model.weight)
    before = model.weight.detach().clone()
    with pytest.raises(RuntimeError, match="requires_grad=False"):
        opt.step()
    assert torch.equal(model.weight, before) and not opt.state
