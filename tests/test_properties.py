"""Property tests of ProxScoreOptimizer over parameter shapes, dtypes and group layouts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_proxvi import ProxScoreOptimizer

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
PROPS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


@st.composite
def layouts(draw):
    """A list of (shape, dtype) parameters split into 1-3 non-empty groups."""
    n = draw(st.integers(1, 5))
    specs = [(tuple(draw(st.lists(st.integers(1, 4), max_size=3))), draw(st.sampled_from(DTYPES)))
             for _ in range(n)]
    n_groups = draw(st.integers(1, min(3, n)))
    assign = draw(st.lists(st.integers(0, n_groups - 1), min_size=n, max_size=n))
    groups = [[i for i in range(n) if assign[i] == g] for g in range(n_groups)]
    return specs, [g for g in groups if g]


def make_params(specs, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
            for shape, dtype in specs]


def make_optimizer(params, groups, foreach, **kw):
    param_groups = [{"params": [params[i] for i in idx], "lr": 10.0 ** -(j + 1)}
                    for j, idx in enumerate(groups)]
    return ProxScoreOptimizer(param_groups, dataset_size=50,
                              generator=torch.Generator().manual_seed(0), foreach=foreach, **kw)


def random_grads(params, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype) for p in params]


def run(params, opt, n_steps, scale):
    for t in range(n_steps):
        for p, grad in zip(params, random_grads(params, 1000 + t, scale), strict=True):
            p.grad = grad
        opt.step()


def expected_state_dtype(p):
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def per_weight_state(opt, p):
    return {k: v for k, v in opt.state[p].items() if k != "step" and torch.is_tensor(v)}


hyper = st.fixed_dictionaries({
    "inner_steps": st.integers(1, 3),
    "mean_update": st.sampled_from(["score", "residual"]),
    "warmup_steps": st.sampled_from([0, 1]),
    "prior_mean": st.sampled_from(["zero", "init"]),
})


@PROPS
@given(layout=layouts(), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       foreach=st.booleans(), kw=hyper)
def test_steps_keep_state_finite_and_dtypes(layout, seed, scale, foreach, kw):
    specs, groups = layout
    params = make_params(specs, seed)
    opt = make_optimizer(params, groups, foreach, **kw)
    run(params, opt, n_steps=3, scale=scale)
    for p, (shape, dtype) in zip(params, specs, strict=True):
        assert p.dtype == dtype and tuple(p.shape) == shape
        assert torch.isfinite(p).all()
        state = per_weight_state(opt, p)
        assert {"mean", "log_scale"} <= state.keys()
        for k, v in state.items():
            assert v.dtype == expected_state_dtype(p), (k, v.dtype, p.dtype)
            assert v.shape == p.shape, k
            assert torch.isfinite(v).all(), f"non-finite {k} for a {dtype} {shape} parameter"
        assert float(opt.state[p]["step"]) == 3 * kw["inner_steps"]
        mean, std = opt.posterior_mean(p), opt.posterior_std(p)
        assert mean.dtype == expected_state_dtype(p) and mean.shape == p.shape
        assert std.shape == p.shape and (std > 0).all() and torch.isfinite(std).all()


@PROPS
@given(layout=layouts(), seed=st.integers(0, 2**16), kw=hyper)
def test_flat_and_single_tensor_paths_agree_bit_for_bit(layout, seed, kw):
    # the same kernels on the same numbers in the same order (tests/test_paths.py): any layout of
    # shapes, dtypes and groups gives the same bits
    specs, groups = layout
    runs = []
    for foreach in (True, False):
        params = make_params(specs, seed)
        opt = make_optimizer(params, groups, foreach, **kw)
        run(params, opt, n_steps=3, scale=1.0)
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a.detach(), b.detach())
        sa, sb = per_weight_state(oa, a), per_weight_state(ob, b)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
        assert float(oa.state[a]["step"]) == float(ob.state[b]["step"])


@pytest.mark.parametrize("foreach", [True, False])
def test_foreach_agreement_is_not_vacuous(foreach):
    """The same seed gives the same run; a different one does not (so the check above bites)."""
    specs = [((3, 2), torch.float64), ((), torch.float64)]
    outs = []
    for gen_seed in (0, 0, 1):
        params = make_params(specs, 0)
        opt = ProxScoreOptimizer(params, lr=1e-2, dataset_size=50, foreach=foreach,
                                 generator=torch.Generator().manual_seed(gen_seed))
        run(params, opt, n_steps=2, scale=1.0)
        outs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1], strict=True))
    assert not any(torch.allclose(a, c) for a, c in zip(outs[0], outs[2], strict=True))
