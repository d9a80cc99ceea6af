"""The family protocol and each family's closed forms, checked against ground truth.

* parity: the generic autograd proximal step (used by the flows) equals the Gaussian kernel's
  update in float64, and the element-wise flow's update with several inner steps is Adam on
  autograd of its proximal objective (tests/test_paths.py checks the Gaussian family's paths);
* closed forms: every family's log-density is normalised, its score is the gradient of its
  log-density, its mean and std are the true moments, its KL is zero to itself;
* fixed points: at q = p (a target inside the family) a step moves nothing.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build_data, build_model

from torch_proxvi import ProxScoreOptimizer, kernels
from torch_proxvi.families import _proximal, flow, get, sinh_arcsinh
from torch_proxvi.kernels import ScoreStats, StepHyper, accumulate

F64 = torch.float64
SAS_SHAPES = [(0.0, 0.0), (1.0, math.log(0.6)), (-2.0, math.log(2.5)), (3.5, math.log(0.3))]


def _group(family: str, params, **kw) -> dict:
    """A group dict as the optimizer would hold it (the families only read hyperparameters)."""
    opt = ProxScoreOptimizer(params, lr=1e-2, dataset_size=10, family=family, init_std=0.7, **kw)
    return opt.param_groups[0]


# ---------------------------------------------------------------------------- parity
@pytest.mark.parametrize("mean_update", ["score", "residual"])
@pytest.mark.parametrize("inner_steps,warmup", [(1, False), (3, False), (3, True)])
def test_generic_proximal_step_equals_the_closed_form_gaussian_update(mean_update, inner_steps, warmup):
    g = torch.Generator().manual_seed(0)
    shape, k = (7, 3), 4
    mean = torch.randn(shape, generator=g, dtype=F64)
    log_scale = -1 + 0.3 * torch.randn(shape, generator=g, dtype=F64)
    thetas = [mean + log_scale.exp() * torch.randn(shape, generator=g, dtype=F64) for _ in range(k)]
    scores = [-(t - 0.2) / 0.3 + 0.1 * torch.randn(shape, generator=g, dtype=F64) for t in thetas]
    moments = [0.01 * torch.rand(shape, generator=g, dtype=F64) for _ in range(4)]
    kw = dict(betas=(0.9, 0.999), eps=1e-8, inner_steps=inner_steps, mean_update=mean_update)

    closed = [t.clone() for t in (mean, log_scale, *moments)]
    stats = ScoreStats.zeros_like(mean)
    for t, s in zip(thetas, scores):
        accumulate(stats, t - mean, s, 1.0 / k)
    state = dict(zip(("mean", "log_scale", "mean_exp_avg", "mean_exp_avg_sq", "log_scale_exp_avg",
                      "log_scale_exp_avg_sq"), closed))
    h = StepHyper(lr=0.05, scale_lr=0.02, beta1=0.9, beta2=0.999, eps=1e-8, score_scale=-1.0, prior_precision=0.0,
                  prox_weight=2.0, step=5.0, mean_update=mean_update, inner_steps=inner_steps,
                  update_scale=not warmup)
    kernels.gaussian.update(state, stats, h)

    generic = [t.clone() for t in (mean, log_scale, *moments)]
    variables = [_proximal.Variable(generic[0], generic[2], generic[3], 0.05, location=True),
                 _proximal.Variable(generic[1], generic[4], generic[5], 0.02, frozen=warmup,
                                    bounds=(kernels.gaussian.LOG_SCALE_MIN, kernels.gaussian.LOG_SCALE_MAX))]
    family = get("gaussian")

    def model_score(phi):
        return [(phi[0] - t) / torch.exp(2 * phi[1]) for t in thetas]

    def kl(phi, phi_t):
        return family.kl({}, [{"mean": phi[0], "log_scale": phi[1]}], [{"mean": phi_t[0], "log_scale": phi_t[1]}])

    _proximal.proximal_step(variables, [torch.tensor(5.0)], model_score, scores, [sum(scores) / k],
                            torch.exp(2 * log_scale), kl=kl, prox_weight=2.0, **kw)
    for a, b in zip(closed, generic):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.equal(generic[0], mean)


@pytest.mark.parametrize("mean_update", ["residual", "score"])
def test_elementwise_flow_inner_steps_are_adam_on_autograd_of_its_proximal_objective(mean_update):
    """Several inner steps and K = 2 samples (the generic step): each inner step is
    torch.optim.Adam on autograd of J(phi) = (1/K) sum_k ||sigma_t (d/dtheta log q_phi(theta_k) -
    s_k)||^2 + prox * KL(q_phi || q_t), the model score by autograd of the log-density and the KL
    from the same one-draw estimate (its draws replayed from a copy of the generator)."""
    g = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(5, generator=g, dtype=F64))
    group = _group("elementwise_flow", [p], inner_steps=3, prox_weight=5.0, mean_update=mean_update)
    family, state = get("elementwise_flow"), {}
    family.init_state(state, p, group)
    state["skew"].copy_(0.3 * torch.randn(5, generator=g, dtype=F64))
    start = [state[n].clone() for n in ("loc", "log_scale", "skew", "log_tail")]
    thetas = family.sample(group, [p], [state], g, count=2)[0]
    scores = -(thetas - 0.5) / 0.04 + torch.randn(thetas.shape, generator=g, dtype=F64)
    acc = None
    for theta, s in zip(thetas, scores):
        acc = family.collect(group, state, theta, s, acc, 0.5)
    generator = torch.Generator().manual_seed(9)
    replay = torch.Generator().manual_seed(9)
    family.update(group, [state], [acc], generator=generator)

    phi = [t.clone() for t in start]
    lr, shape_lr = group["lr"], group["lr"] * group["scale_lr_ratio"]
    opts = [torch.optim.Adam([v], lr=lr if i == 0 else shape_lr, betas=group["betas"], eps=group["eps"], foreach=False)
            for i, v in enumerate(phi)]
    weight = torch.exp(2 * start[1])

    def log_q(theta, params):
        return sinh_arcsinh.log_prob(theta, *params).sum()

    for inner in range(3):
        leaves = [v.detach().clone().requires_grad_() for v in phi]
        fit = 0.0
        for theta, s in zip(thetas, scores):
            th = theta.clone().requires_grad_()
            (model_score,) = torch.autograd.grad(log_q(th, leaves), th, create_graph=True)
            fit = fit + (weight * (model_score - s) ** 2).sum() / 2
        kl = 0.0
        if inner > 0:
            z = torch.randn(5, generator=replay, dtype=F64)
            theta = sinh_arcsinh.transform(z, *leaves)
            kl = group["prox_weight"] * (log_q(theta, leaves) - log_q(theta, start))
        grads = torch.autograd.grad(fit + kl, leaves, allow_unused=True, retain_graph=True)
        grads = [torch.zeros_like(v) if gr is None else gr for v, gr in zip(phi, grads)]
        if mean_update == "score":      # the location follows -2<s> plus the KL's pull
            kl_loc = torch.autograd.grad(kl, leaves[0])[0] if inner > 0 else 0.0
            grads[0] = -2 * scores.mean(0) + kl_loc
        for opt, v, gr in zip(opts, phi, grads):
            v.grad = gr
            opt.step()
        phi[1].data.clamp_(kernels.gaussian.LOG_SCALE_MIN, kernels.gaussian.LOG_SCALE_MAX)
        phi[2].data.clamp_(*sinh_arcsinh.SKEW_BOUNDS)
        phi[3].data.clamp_(*sinh_arcsinh.LOG_TAIL_BOUNDS)
    for name, want in zip(("loc", "log_scale", "skew", "log_tail"), phi):
        torch.testing.assert_close(state[name], want, rtol=1e-9, atol=1e-12, msg=name)
    assert float(state["step"]) == 3


# ---------------------------------------------------------------------------- closed forms
def _family_states(name: str, seed: int = 0, dim: int = 2):
    """A parameter of ``dim`` weights and a non-trivial state of family ``name`` (float64)."""
    p = torch.nn.Parameter(torch.zeros(dim, dtype=F64))
    group = _group(name, [p])
    state: dict = {}
    family = get(name)
    family.init_state(state, p, group)
    g = torch.Generator().manual_seed(seed)
    if name == "elementwise_flow":
        state["skew"].copy_(torch.tensor([1.0, -0.5][:dim], dtype=F64))
        state["log_tail"].copy_(torch.tensor([math.log(0.6), math.log(1.8)][:dim], dtype=F64))
    if name == "flow":
        state["flow"].copy_(0.1 * torch.randn(state["flow"].shape, generator=g, dtype=F64))
    key = "mean" if name == "gaussian" else "loc"
    state[key].copy_(torch.tensor([0.3, -1.0][:dim], dtype=F64))
    state["log_scale"].copy_(torch.tensor([0.2, -0.4][:dim], dtype=F64))
    return family, group, p, state


@pytest.mark.parametrize("name", ["gaussian", "elementwise_flow", "flow"])
def test_log_prob_is_normalised_and_score_is_its_gradient(name):
    family, group, p, state = _family_states(name)
    # theta = 3 sinh(u) on a grid of u in [-8, 8]: reaches |theta| = 4500 for the heavy tails
    u = torch.linspace(-8, 8, 1001, dtype=F64)
    axis, jacobian = 3 * torch.sinh(u), 3 * torch.cosh(u) * (u[1] - u[0])
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    # in chunks: the dense flow's hidden layers on all 1M points at once ran 3x slower (memory)
    density = torch.cat([family.log_prob(group, [state], [chunk]) for chunk in grid.split(1 << 16)]).exp()
    mass = float((density * torch.outer(jacobian, jacobian).reshape(-1)).sum())
    assert abs(mass - 1) < 1e-4, mass
    theta = grid[::997].clone().requires_grad_()
    (auto,) = torch.autograd.grad(family.log_prob(group, [state], [theta]).sum(), theta)
    torch.testing.assert_close(family.score(group, [state], [theta.detach()])[0], auto, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["gaussian", "elementwise_flow", "flow"])
def test_mean_std_and_samples_agree(name):
    family, group, p, state = _family_states(name)
    draws = family.sample(group, [p], [state], torch.Generator().manual_seed(3), 200_000)[0]
    mean, std = family.mean(group, [p], [state])[0], family.std(group, [p], [state])[0]
    sd = draws.std(0)
    # Monte Carlo error of 200k draws (std/447) plus the flow's own 2048-draw estimate (std/45)
    tolerance = (5 / math.sqrt(200_000) + (4 / math.sqrt(flow.SUMMARY_SAMPLES) if name == "flow" else 0))
    assert ((draws.mean(0) - mean).abs() < tolerance * sd).all(), (draws.mean(0), mean)
    assert ((sd - std).abs() < 2 * tolerance * sd).all(), (sd, std)


@pytest.mark.parametrize("skew,log_tail", SAS_SHAPES)
def test_sinh_arcsinh_moments_match_numerical_integration(skew, log_tail):
    integrate = pytest.importorskip("scipy.integrate", reason="scipy is missing (scikit-learn, in the dev "
                                    "extra, brings it): pip install scipy")

    def moment(power):
        def f(z):
            return math.sinh((math.asinh(z) + skew) / math.exp(log_tail)) ** power * math.exp(-z * z / 2)
        return integrate.quad(f, -math.inf, math.inf, epsabs=1e-13, epsrel=1e-12)[0] / math.sqrt(2 * math.pi)

    m1, m2 = moment(1), moment(2)
    loc, log_scale = 0.7, math.log(2.0)
    args = [torch.tensor([v], dtype=F64) for v in (loc, log_scale, skew, log_tail)]
    mean, std = sinh_arcsinh.moments(*args)
    expected = loc + 2.0 * (m1 - math.sinh(skew / math.exp(log_tail)))  # loc is the median
    assert abs(float(mean) - expected) < 1e-6 * max(1.0, abs(expected))
    assert abs(float(std) - 2.0 * math.sqrt(m2 - m1 * m1)) < 1e-6 * 2.0 * math.sqrt(m2 - m1 * m1)


def test_elementwise_flow_starts_as_the_gaussian_and_flow_at_identity():
    p = torch.nn.Parameter(torch.tensor([0.4, -1.2, 3.0], dtype=F64))
    theta = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    reference = None
    for name in ("gaussian", "elementwise_flow", "flow"):
        group = _group(name, [p])
        state: dict = {}
        family = get(name)
        family.init_state(state, p, group)
        values = (family.log_prob(group, [state], [theta]), family.score(group, [state], [theta])[0])
        if reference is None:
            reference = values
        for a, b in zip(values, reference):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["elementwise_flow", "flow"])
@pytest.mark.parametrize("kw, expected", [
    ({}, 1e-3),
    ({"init_curvature": 1.0}, (500 * 1.0 + 1.0) ** -0.5),
    ({"init_curvature": 2.0, "prior_precision": 10.0, "temperature": 0.5}, (500 * 2.0 / 0.5 + 10.0) ** -0.5),
    ({"init_curvature": 0.0, "prior_precision": 4.0}, 0.5),
    ({"init_std": 0.3, "init_curvature": 2.0}, 0.3),
])
def test_flows_start_their_scale_from_the_data_and_the_prior(name, kw, expected):
    # init_std=None with init_curvature h_0: sigma_0 = (N h_0 / T + lambda_0)^(-1/2), the start of
    # the Gaussian's rule="solved"; without it 1e-3 (the data's start cost the element-wise flow
    # NLL on digits from scratch: docs/benchmarks.md); an explicit init_std wins
    model = torch.nn.Linear(3, 2)
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=500, family=name, **kw)
    assert opt.param_groups[0]["init_std"] == pytest.approx(expected, rel=1e-12)
    # the element-wise flow's std is closed form; the dense flow's a Monte Carlo estimate over
    # SUMMARY_SAMPLES = 2048 draws (standard error std / 45): 10 % is 4.5 standard errors
    std = opt.posterior_std(model.weight)
    torch.testing.assert_close(std, torch.full((2, 3), expected), rtol=0.1 if name == "flow" else 1e-6, atol=0)


@pytest.mark.parametrize("name", ["elementwise_flow", "flow"])
def test_flows_start_a_weight_tensor_relative_to_its_scale_when_asked(name):
    # relative_init_curvature kappa: sigma_0 = (N kappa / (T r^2) + lambda_0)^(-1/2) for the weight
    # matrix (r: its RMS), init_std for the bias (the Gaussian's fine-tune start, test_solved_step.py)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.normal_(0, 0.05)
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=500, family=name, init_curvature=1.0,
                             relative_init_curvature=0.01, temperature=0.5)
    r2 = model.weight.detach().double().pow(2).mean().item()
    expected = (500 * 0.01 / (0.5 * r2) + 1.0) ** -0.5
    tol = 0.1 if name == "flow" else 1e-6            # the dense flow's std: Monte Carlo (test above)
    torch.testing.assert_close(opt.posterior_std(model.weight), torch.full((2, 3), expected), rtol=tol, atol=0)
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    scale = opt.state[model.weight]["log_scale"].exp()
    assert bool(((scale / expected).log().abs() < 0.5).all())
    bias = opt.state[model.bias]["log_scale"].exp()
    assert bool(((bias / (500 / 0.5 + 1.0) ** -0.5).log().abs() < 0.5).all())


@pytest.mark.parametrize("name", ["elementwise_flow", "flow"])
@pytest.mark.parametrize("h0", [-1.0, float("nan"), float("inf"), True, "1", 1e300])
def test_flows_refuse_a_bad_init_curvature_naming_it(name, h0):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="init_curvature"):
        ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=500, family=name, init_curvature=h0)


@pytest.mark.parametrize("name", ["gaussian", "elementwise_flow", "flow"])
def test_kl_is_zero_to_itself_and_positive_to_another(name):
    family, group, p, state = _family_states(name)
    other = copy.deepcopy(state)
    key = "mean" if name == "gaussian" else "loc"
    other[key] += 0.5
    g = torch.Generator().manual_seed(0)
    assert abs(float(family.kl(group, [state], [state], g))) < 1e-12
    # a shift by 0.5 in both coordinates: the Gaussian's KL is 0.125 (e^-0.4 + e^0.8) exactly
    kl = float(family.kl(group, [state], [other], g))
    assert kl > 0.05, kl
    if name == "gaussian":
        assert abs(kl - 0.125 * (math.exp(-0.4) + math.exp(0.8))) < 1e-12


# ---------------------------------------------------------------------------- closed-form flow step
def test_sinh_arcsinh_score_derivatives_equal_autograd():
    g = torch.Generator().manual_seed(0)
    n = 2000
    theta = torch.randn(n, generator=g, dtype=F64) * 2
    phi = [torch.randn(n, generator=g, dtype=F64) * s for s in (0.3, 0.5, 1.0, 0.5)]
    score, derivatives = sinh_arcsinh.score_and_derivatives(theta, *phi)
    leaves = [v.clone().requires_grad_() for v in phi]
    reference = sinh_arcsinh.score(theta, *leaves)
    torch.testing.assert_close(score, reference.detach(), rtol=1e-12, atol=1e-12)
    for leaf, derivative in zip(leaves, derivatives):
        # each weight's score depends only on its own parameters: the gradient of the sum is the
        # element-wise derivative
        (expected,) = torch.autograd.grad(reference.sum(), leaf, retain_graph=True)
        torch.testing.assert_close(derivative, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mean_update", ["score", "residual"])
@pytest.mark.parametrize("betas,warmup_steps", [((0.9, 0.999), 0), ((0.0, 0.99), 2)])
def test_elementwise_flow_closed_form_step_equals_the_autograd_step(mean_update, betas, warmup_steps, monkeypatch):
    """The common step (K = 1, one inner step) of the element-wise flow takes closed-form gradients;
    in float64 it gives the generic autograd step's numbers, through warm-up, clamping and both
    mean rules."""
    taken = []
    real = sinh_arcsinh.closed_form_kernel
    monkeypatch.setattr(sinh_arcsinh, "closed_form_kernel", lambda *a, **k: taken.append(1) or real(*a, **k))
    family = get("elementwise_flow")
    runs = []
    for closed_form in (True, False):
        monkeypatch.setattr(family, "closed_form", closed_form)
        model = build_model(seed=0).double()
        x, y = build_data(seed=1)
        opt = ProxScoreOptimizer(model.parameters(), lr=0.05, dataset_size=64, family="elementwise_flow",
                                 mean_update=mean_update, betas=betas, warmup_steps=warmup_steps, init_std=0.1,
                                 generator=torch.Generator().manual_seed(2))
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x.double()), y).backward()
            opt.step()
        runs.append((model, opt))
    assert taken, "the closed-form step was not taken"
    (model_a, opt_a), (model_b, opt_b) = runs
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        for key in opt_a.state[a]:
            torch.testing.assert_close(opt_a.state[a][key], opt_b.state[b][key], rtol=1e-10, atol=1e-10)
    moved = [float((opt_a.state[a]["skew"]).abs().max()) for a in model_a.parameters()]
    assert max(moved) > 1e-3      # the shape parameters really moved (not a trivial equality)


def test_elementwise_flow_compiled_step_matches_the_eager_closed_form():
    """compiled=True runs the element-wise flow's closed-form step as one compiled kernel per
    weight tensor (Inductor); same samples (torch's generator), so same numbers to rounding."""
    runs = []
    for compiled in (False, True):
        model = build_model(seed=0).double()
        x, y = build_data(seed=1)
        opt = ProxScoreOptimizer(model.parameters(), lr=0.05, dataset_size=64, family="elementwise_flow",
                                 init_std=0.1, compiled=compiled, generator=torch.Generator().manual_seed(2))
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(model(x.double()), y).backward()
            opt.step()
        runs.append((model, opt))
    (model_a, opt_a), (model_b, opt_b) = runs
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        for key in ("loc", "log_scale", "skew", "log_tail", "skew_exp_avg_sq"):
            torch.testing.assert_close(opt_a.state[a][key], opt_b.state[b][key], rtol=1e-10, atol=1e-10)
    assert sinh_arcsinh.closed_form_kernel in sinh_arcsinh._compiled      # the compiled kernel was built and used


# ---------------------------------------------------------------------------- fixed points
@pytest.mark.parametrize("name", ["elementwise_flow", "flow"])
def test_the_target_itself_is_a_fixed_point(name):
    """At q = p every residual is zero, so the proximal gradient vanishes and a step moves
    nothing; toward a shifted target the same steps move. (With the element-wise flow's default
    ``mean_update="score"`` the location's gradient -2<s> vanishes only in expectation at q = p,
    so the exact check uses the residual rule.) ``eps=1`` makes the inner Adam a plain
    gradient step (Adam's own scale invariance would blow a 1e-12 gradient up to a step of lr),
    and the prior is negligible (1e-30)."""
    family, group, p, target = _family_states(name, dim=2)
    moved = {}
    for shift in (0.0, 0.3):
        p_target = copy.deepcopy(target)
        p_target["loc"] += shift
        q = torch.nn.Parameter(torch.zeros(2, dtype=F64))
        opt = ProxScoreOptimizer([q], lr=1e-2, dataset_size=1, prior_precision=1e-30, family=name,
                                 mc_samples=8, eps=1.0, mean_update="residual")
        opt.state[q] = copy.deepcopy(target)
        before = copy.deepcopy(target)
        grp = opt.param_groups[0]

        def closure(opt=opt, grp=grp, p_target=p_target, q=q):
            opt.zero_grad()
            loss = -family.log_prob(grp, [p_target], [q])
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        keys = [k for k in (*family.variational, "skew", "log_tail", "flow") if k in before]
        moved[shift] = max(float((opt.state[q][k] - before[k]).abs().max()) for k in keys)
    assert moved[0.0] < 1e-9, moved
    assert moved[0.3] > 1e-4, moved
