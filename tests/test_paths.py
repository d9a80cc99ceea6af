"""The dispatcher's paths (torch_proxvi/kernels/dispatch.py) run the same math.

``single`` is the reference (per tensor, torch's generator); ``flat`` packs the same calls into
flat buffers and must give the same bits; ``compiled`` runs the same function as one compiled
kernel with hashed noise: its state update must equal the reference's in float64, its kernel its
eager body, and its samples must be draws from q whatever the packing. The contract suite runs
every path too (the path axis of tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from torch_proxvi import ProxScoreOptimizer
from torch_proxvi.kernels import StepHyper, dispatch, layout
from torch_proxvi.reference.testing import PeakTemporaries

F64, BF16 = torch.float64, torch.bfloat16
CPU = torch.device("cpu")


def use_eager_kernel(monkeypatch):
    """The compiled path with its kernel body run eagerly (no build): the same calls, noise and
    layout as ``compiled=True``, at test speed."""
    monkeypatch.setattr(dispatch, "compiled_kernel", lambda: dispatch.kernel_body)
    monkeypatch.setattr(dispatch, "compiler_available", lambda device_type: True)


def path_options(path: str, monkeypatch) -> dict:
    if path == "single":
        return {"foreach": False}
    if path == "flat":
        return {"compiled": False}
    use_eager_kernel(monkeypatch)
    return {"compiled": True}


def mixed_params(dtypes=(F64,) * 5, seed=0):
    """Small (packed) and large tensors, a transposed (not contiguous) large one."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(30,), (130, 140), (7, 5), (150, 120)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=F64).to(d)) for s, d in zip(shapes, dtypes)]
    params.append(torch.nn.Parameter(torch.randn(140, 130, generator=g, dtype=F64).to(dtypes[4]).t()))
    return params


def set_grads(params, g):
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g, dtype=F64) * 0.3 + 0.1 * p.detach().double()).to(p.dtype)


def run(params, opt, steps=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        set_grads(params, g)
        opt.step()


def make(params, **kw):
    kw = {"lr": 0.05, "dataset_size": 40, "init_std": 0.2, "generator": torch.Generator().manual_seed(3), **kw}
    return ProxScoreOptimizer(params, **kw)


CONFIGS = [
    dict(mean_update="residual"),
    dict(mean_update="score", prior_mean="init", betas=(0.0, 0.99), warmup_steps=1),
    dict(rule="elbo", prior_mean="init", temperature=0.5, prior_precision=3.0),
    dict(mean_update="residual", inner_steps=2, temperature=2.0),
    dict(rule="solved", prior_mean="init", temperature=0.5, prior_precision=3.0),
    dict(rule="solved", mean_update="newton", betas=(0.0, 0.99), warmup_steps=1),
    dict(rule="solved", mean_update="newton", prior_mean="init"),
]
DTYPES = [(F64,) * 5, (torch.float32,) * 5, (torch.float32, BF16, BF16, torch.float32, BF16)]


@pytest.mark.parametrize("chunk", [None, 5000])
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_flat_path_gives_the_single_tensor_path_bit_for_bit(kw, chunk, monkeypatch):
    # the same functions on the same numbers in the same canonical order, the noise drawn in the
    # same order: the same bits whatever the packing (chunk=5000 steps the large tensors in pieces)
    if chunk is not None:
        monkeypatch.setattr(layout, "CHUNK_NUMEL", chunk)
    for dtypes in DTYPES:
        pa, pb = mixed_params(dtypes), mixed_params(dtypes)
        oa, ob = make(pa, foreach=False, **kw), make(pb, compiled=False, **kw)
        run(pa, oa)
        run(pb, ob)
        small = [ob.state[p]["mean"] for p in pb if p.numel() < layout.SMALL_NUMEL]
        assert layout.flat_buffer_of(small) is not None, "the small tensors' state was not packed"
        for a, b in zip(pa, pb):
            assert a.dtype == b.dtype and a.stride() == b.stride()
            assert oa.state[a]["mean"].dtype == (F64 if a.dtype == F64 else torch.float32)
            assert torch.equal(a, b)
            assert oa.state[a].keys() == ob.state[b].keys()
            for k in oa.state[a]:
                assert torch.equal(oa.state[a][k], ob.state[b][k]), k


def reference_step(params, opt, kw):
    """One K = 1 step computed here from the kernels' math, with the score's hyperparameters
    (dataset size, temperature, prior) taken from ``kw``, not from the optimizer."""
    group = opt.param_groups[0]
    n, temperature = 40.0, kw.get("temperature", 1.0)
    out = {}
    for p in params:
        state = {k: v.clone() for k, v in opt.state[p].items()}
        h = StepHyper.of(group, float(state["step"]))._replace(
            score_scale=-n / temperature, prior_precision=kw.get("prior_precision", 1.0))
        dtype = state["mean"].dtype
        theta, grad = p.detach().to(dtype), p.grad.to(dtype)
        centred = theta - state["prior_mean"] if "prior_mean" in state else theta
        s = -n / temperature * grad - h.prior_precision * centred
        dispatch.RULES[h.rule].update(state, gaussian_stats(theta - state["mean"], s), h)
        out[p] = state
    return out


def gaussian_stats(u, s):
    from torch_proxvi.kernels import one_sample
    return one_sample(u, s)


@pytest.mark.parametrize("path", dispatch.PATHS)
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_every_path_updates_the_state_as_the_kernels_math_says(path, kw, monkeypatch):
    # Temperature, prior precision and prior mean reach the update on every path: each path's
    # state after a step equals the update computed here from the gradients (float64).
    params = mixed_params()
    opt = make(params, **path_options(path, monkeypatch), **kw)
    run(params, opt, steps=2)
    set_grads(params, torch.Generator().manual_seed(7))
    expected = reference_step(params, opt, kw) if opt.state[params[0]] else None
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, old in zip(params, before):
        state = opt.state[p]
        assert state.keys() == expected[p].keys()
        for k in ("mean", "log_scale", "mean_exp_avg", "mean_exp_avg_sq", "log_scale_exp_avg_sq"):
            if k in expected[p]:
                torch.testing.assert_close(state[k], expected[p][k], rtol=1e-12, atol=1e-14, msg=k)
        assert float(state["step"]) == float(expected[p]["step"]) + kw.get("inner_steps", 1)
        assert not torch.equal(p.detach(), old) and not torch.equal(p.detach(), state["mean"])  # a fresh sample


def standardised_samples(path, monkeypatch, draws=100_000, dtypes=(torch.float32,) * 5):
    """The weights after one step, standardised by the state's mean and std: N(0, 1) if the path
    samples from q. The state varies across weights, so a wrong mean or std shows."""
    g = torch.Generator().manual_seed(11)
    params = mixed_params(dtypes)
    opt = make(params, **path_options(path, monkeypatch))
    z = []
    while sum(t.numel() for t in z) < draws:
        set_grads(params, g)
        opt.step()
        for p in params:
            st = opt.state[p]
            z.append(((p.detach().float() - st["mean"].float()) / st["log_scale"].exp().float()).flatten())
    return torch.cat(z)[:draws].double()


def assert_standard_normal(z):
    n = z.numel()
    # standard errors at 1e5 draws: 0.0032 (mean), 0.0045 (variance); the margins are 5 of them
    assert abs(float(z.mean())) < 0.016, float(z.mean())
    assert abs(float(z.var()) - 1) < 0.023, float(z.var())
    # Kolmogorov-Smirnov against N(0, 1): the 1e-4 critical value is 2.05 / sqrt(n)
    cdf = torch.special.ndtr(z.sort().values)
    grid = torch.arange(1, n + 1, dtype=F64) / n
    distance = torch.maximum(grid - cdf, cdf - (grid - 1 / n)).max()
    assert float(distance) < 2.05 / n**0.5, float(distance)


@pytest.mark.parametrize("path", dispatch.PATHS)
def test_every_path_writes_a_draw_from_q(path, monkeypatch):
    assert_standard_normal(standardised_samples(path, monkeypatch))


def test_bf16_weights_are_rounded_draws_from_q(monkeypatch):
    # bf16 weights hold the draw rounded to 8 bits of mantissa: relative error <= 2^-8 of the weight,
    # so the standardised draw is checked on the flat path only to its mean and spread
    z = standardised_samples("flat", monkeypatch, draws=20_000, dtypes=(BF16,) * 5)
    assert abs(float(z.mean())) < 0.1 and 0.8 < float(z.std()) < 1.2


# ---------------------------------------------------------------------------- the compiled kernel
def compiled_steps(variant: dict, kernel, steps=3, **kw):
    params = mixed_params()
    opt = make(params, generator=torch.Generator().manual_seed(1), **kw)
    group, gen = opt.param_groups[0], opt._generator(CPU)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        set_grads(params, g)
        states = [opt._state(p, group) for p in params]
        h = StepHyper.of(group, float(states[0]["step"]))
        dispatch.step(params, states, h, gen, path="compiled", kernel=kernel, **variant)
    return params, opt


def assert_same_run(a, b, exact=True):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        assert x.stride() == y.stride()
        check = torch.equal if exact else (lambda u, v: torch.allclose(u, v, rtol=1e-12, atol=1e-12))
        assert check(x, y)
        for k, value in oa.state[x].items():
            assert check(value, ob.state[y][k]), k


def test_the_compiled_step_does_not_depend_on_how_the_batch_is_packed():
    # The noise of the number at canonical offset o is hash(seed, o), so every packing (the CPU's,
    # an accelerator's, tiny chunks) gives the same step, bit for bit, with the eager kernel body.
    variants = [dict(), dict(pack_all=True), dict(pack_all=True, chunk=50), dict(chunk=10)]
    sizes = [p.numel() for p in mixed_params()]
    plans = [layout.plan(sizes, lambda i: True, CPU, v.get("chunk"), v.get("pack_all")) for v in variants]
    assert len({str(p) for p in plans}) == len(plans)
    runs = [compiled_steps(v, dispatch.kernel_body) for v in variants]
    for other in runs[1:]:
        assert_same_run(runs[0], other)


@pytest.mark.parametrize("kw", [dict(), dict(mean_update="residual", prior_mean="init", betas=(0.0, 0.99)),
                                dict(rule="solved", prior_mean="init", temperature=0.5)],
                         ids=["defaults", "residual-init-nomomentum", "solved-init-tempered"])
def test_the_compiled_kernel_is_its_eager_body(kw):
    if not dispatch.compiler_available("cpu"):
        pytest.skip("no C++ compiler here: torch.compile cannot build the CPU kernel")
    eager = compiled_steps({}, dispatch.kernel_body, **kw)
    built = compiled_steps({}, None, **kw)
    assert_same_run(eager, built, exact=False)


def test_packed_state_lives_in_flat_buffers_and_edits_to_it_are_honoured(monkeypatch):
    use_eager_kernel(monkeypatch)

    def two_steps(edit=None):
        params = mixed_params()
        opt = make(params, compiled=True)
        g = torch.Generator().manual_seed(2)
        for step in range(2):
            if step and edit:
                edit(opt, params)
            set_grads(params, g)
            opt.step()
        return params, opt

    params, opt = two_steps()
    # the two small tensors share a call, the transposed large one is packed alone, the other
    # two large ones are stepped in place
    small, transposed, large = params[0:3:2], params[4], params[1:4:2]
    bases = {}
    for name in ("mean", "log_scale", "mean_exp_avg", "mean_exp_avg_sq"):
        base = layout.flat_buffer_of([opt.state[p][name] for p in small])
        assert base is not None and base.numel() == sum(p.numel() for p in small)
        assert all(opt.state[p][name].shape == p.shape for p in small)
        assert opt.state[transposed][name].is_contiguous()           # laid out in the packed order
        assert all(opt.state[p][name]._base is None for p in large)
        bases[name] = base
    set_grads(params, torch.Generator().manual_seed(5))
    opt.step()
    assert all(layout.flat_buffer_of([opt.state[p][n] for p in small]) is b for n, b in bases.items())

    # an edit in place and a replaced state tensor give the same step: the replacement is laid
    # out again, not lost
    def in_place(o, ps):
        o.state[ps[0]]["mean"].add_(1.0)
        o.state[ps[2]]["log_scale"].sub_(0.5)

    def replaced(o, ps):
        o.state[ps[0]]["mean"] = o.state[ps[0]]["mean"] + 1.0
        o.state[ps[2]]["log_scale"] = o.state[ps[2]]["log_scale"] - 0.5

    a, b, c = two_steps(in_place), two_steps(replaced), two_steps()
    assert_same_run(a, b)
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][2], c[0][2])    # the edits mattered


def peak_of_a_step(n_tensors, path, monkeypatch, chunk=None):
    if chunk is not None:
        monkeypatch.setattr(layout, "CHUNK_NUMEL", chunk)
    params = [torch.nn.Parameter(torch.randn(100_000)) for _ in range(n_tensors)]
    opt = ProxScoreOptimizer(params, lr=1e-3, dataset_size=100, **path_options(path, monkeypatch))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()                      # state created
    with PeakTemporaries() as tracker:
        opt.step()
    return tracker.peak


@pytest.mark.parametrize("path", ["flat", "compiled"])
def test_temporaries_are_bounded_by_the_chunk_not_the_model(path, monkeypatch):
    # a large tensor is stepped a chunk at a time: the temporaries of a step are a few chunks
    # whatever the model's size; the single-tensor path holds several model-sized temporaries
    chunk, model_bytes = 30_000, 8 * 100_000 * 4
    fast = peak_of_a_step(8, path, monkeypatch, chunk=chunk)
    fast_twice = peak_of_a_step(16, path, monkeypatch, chunk=chunk)
    single = peak_of_a_step(8, "single", monkeypatch)
    assert single >= 100_000 * 4 * 4 and single <= 4 * model_bytes
    assert fast <= 16 * chunk * 4 or path == "compiled", fast
    assert fast_twice <= fast * 1.05 + 4096


# ---------------------------------------------------------------------------- choosing the path
def test_compiled_true_without_a_cpu_compiler_is_refused_up_front(monkeypatch):
    import shutil

    monkeypatch.setattr(dispatch, "_available", {})
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="C\\+\\+ compiler.*compiled=False"):
        ProxScoreOptimizer(model.parameters(), dataset_size=10, compiled=True)
    # the default falls back to the eager flat path, with a one-line notice
    monkeypatch.setenv(dispatch.ENV, "1")
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no compiler for cpu"):
        opt = ProxScoreOptimizer(model.parameters(), dataset_size=10)
    assert opt._path(opt.param_groups[0]) == "flat"


def test_the_default_compiles_where_it_can_unless_the_environment_says_no(monkeypatch):
    monkeypatch.setattr(dispatch, "compiler_available", lambda device_type: True)
    model = torch.nn.Linear(2, 1)
    monkeypatch.setenv(dispatch.ENV, "1")
    assert ProxScoreOptimizer(model.parameters(), dataset_size=10)._path({}) == "compiled"
    monkeypatch.setenv(dispatch.ENV, "0")
    assert ProxScoreOptimizer(model.parameters(), dataset_size=10)._path({}) == "flat"
    assert ProxScoreOptimizer(model.parameters(), dataset_size=10, foreach=False)._path({}) == "single"
    with pytest.raises(ValueError, match="compiled=True with foreach=False"):
        ProxScoreOptimizer(model.parameters(), dataset_size=10, compiled=True, foreach=False)


def test_a_kernel_that_fails_to_build_falls_back_to_its_eager_body_with_one_notice(monkeypatch):
    use_eager_kernel(monkeypatch)
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("simulated build failure\nwith a long log")

    monkeypatch.setattr(dispatch, "compiled_kernel", lambda: broken)
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_available", {})
    monkeypatch.setattr(dispatch, "_failed", set())
    reference = compiled_steps({}, dispatch.kernel_body)
    with pytest.warns(RuntimeWarning, match="failed to build on cpu.*simulated build failure"):
        fallen = compiled_steps({}, None)
    assert_same_run(reference, fallen)
    assert len(calls) == 1 and "cpu" in dispatch._failed       # tried once, not at every step


def test_compiled_optimizer_trains_blr_and_resumes_exactly():
    if not dispatch.compiler_available("cpu"):
        pytest.skip("no C++ compiler here: torch.compile cannot build the CPU kernel")
    import io

    from torch_proxvi.reference.testing import fit_linear_regression, linear_regression

    problem = linear_regression()
    _, _, kl = fit_linear_regression(
        lambda ps, n: ProxScoreOptimizer(ps, lr=0.01, dataset_size=n, init_std=0.1, compiled=True,
                                         mean_update="residual"),
        problem, batch_size=200, steps=4000, decay=500)
    # From KL ~2400: at this budget the eager path measures 0.041-0.107 over seeds 0-2 and the
    # compiled one 0.052-0.093 (different noise stream, same update)
    assert kl < 0.15, kl
    model = torch.nn.Linear(3, 1).double()
    opt = ProxScoreOptimizer(model.parameters(), lr=0.01, dataset_size=10, compiled=True)
    x = torch.randn(10, 3, dtype=F64)

    def train(m, o, n):
        for _ in range(n):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    train(model, opt, 2)
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    train(model, opt, 3)
    model2 = torch.nn.Linear(3, 1).double()
    opt2 = ProxScoreOptimizer(model2.parameters(), lr=0.01, dataset_size=10, compiled=True)
    model2.load_state_dict(saved["m"])
    opt2.load_state_dict(saved["o"])
    train(model2, opt2, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
