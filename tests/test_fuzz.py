"""Fuzzing the public API (issue 18): hyperparameters, gradient magnitudes from 0 to 1e38 and
non-finite, and parameter shapes (0-dim, empty, non-contiguous, channels_last) in every dtype.

After any short sequence of steps, either a clear ValueError (construction) or RuntimeError (step)
was raised before anything changed, or a step was skipped with a warning and nothing changed, or
every state tensor is finite. Deterministic (``derandomize=True``), a few seconds.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_proxvi import ADVI, GSM, BaM, ProxScoreOptimizer
from torch_proxvi.families import sinh_arcsinh
from torch_proxvi.kernels import dispatch

FUZZ = settings(max_examples=800, deadline=None, derandomize=True, database=None)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: how a parameter is laid out: 0-dim, empty, a plain vector, a transposed (non-contiguous)
#: matrix, a channels_last 4-d tensor
SHAPES = ("0-dim", "empty", "vector", "transposed", "channels_last")
MAGNITUDES = (0.0, 1e-30, 1e-3, 1.0, 1e6, 1e15, 1e20, 1e38, math.inf, math.nan)


def make_param(kind: str, dtype: torch.dtype, seed: int) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    if kind == "0-dim":
        value = torch.randn((), generator=g)
    elif kind == "empty":
        value = torch.empty(0, 3)
    elif kind == "vector":
        value = torch.randn(5, generator=g)
    elif kind == "transposed":
        value = torch.randn(4, 3, generator=g).t()
    else:
        value = torch.randn(2, 3, 2, 2, generator=g).contiguous(memory_format=torch.channels_last)
    p = torch.nn.Parameter(value.to(dtype))
    if kind == "transposed":
        assert not p.is_contiguous()
    return p


def make_grad(p: torch.Tensor, magnitude: float, single: bool, seed: int) -> torch.Tensor:
    """A gradient like ``p`` (its layout too): everywhere ``magnitude`` times a normal draw, or
    ordinary values with one element set to ``magnitude``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(p.shape, generator=g, dtype=torch.float64)
    if single:
        base = base * 1e-2
        if base.numel():
            base.view(-1)[0] = magnitude
    else:
        base = base * magnitude if math.isfinite(magnitude) else torch.full_like(base, magnitude)
    grad = torch.empty_like(p)       # keeps p's strides (channels_last, transposed)
    grad.copy_(base.to(p.dtype))
    # as backward would give: a weight that overflowed its dtype (a float16 sample past 65504)
    # makes the loss, and so the gradient, non-finite (the step checks the gradients, not the weights)
    grad.masked_fill_(~p.detach().isfinite(), math.nan)
    return grad


#: values that must be refused at construction, one at a time
INVALID = {"init_std": [0.0, 1e-24, 1e9], "eps": [0.0, 1e-45, 1e-30], "prior_precision": [1e39],
           "dataset_size": [1e39], "temperature": [1e-40]}


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 3))
    params = [(draw(st.sampled_from(SHAPES)), draw(st.sampled_from(DTYPES))) for _ in range(n)]
    hyper = dict(
        lr=draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.1, 10.0])),
        init_std=draw(st.sampled_from([1e-13, 1e-3, 1.0, 30.0])),
        dataset_size=draw(st.sampled_from([1, 64, 1e6, 1e30])),
        temperature=draw(st.sampled_from([1e-3, 1.0, 1e3])),
        prior_precision=draw(st.sampled_from([1e-30, 1.0, 1e20])),
        betas=draw(st.sampled_from([(0.9, 0.999), (0.0, 0.999), (0.99, 0.5)])),
        eps=draw(st.sampled_from([1.1e-19, 1e-8, 0.1])),
        inner_steps=draw(st.sampled_from([1, 2])),
    )
    broken = draw(st.sampled_from([None] * 5 + sorted(INVALID)))
    if broken is not None:
        hyper[broken] = draw(st.sampled_from(INVALID[broken]))
    optimizer = draw(st.sampled_from(["gaussian", "elementwise_flow", "advi", "gsm", "bam"]))
    path = draw(st.sampled_from(["flat", "single", "compiled"]))
    if optimizer in ("gsm", "bam"):
        hyper["covariance"] = draw(st.sampled_from(["diagonal", "dense"]))
    closure = draw(st.booleans())
    if closure:
        hyper["mc_samples"] = draw(st.integers(1, 2))
    steps = draw(st.lists(st.tuples(st.sampled_from(MAGNITUDES), st.booleans()), min_size=1, max_size=3))
    return params, hyper, optimizer, path, closure, steps


@contextlib.contextmanager
def eager_compiled_path():
    """The compiled path with its kernels run eagerly (same calls and hashed noise, no build), as
    conftest's ``make_opt`` does."""
    with mock.patch.object(dispatch, "compiled_kernel", lambda: dispatch.kernel_body), \
            mock.patch.object(dispatch, "compiler_available", lambda device_type: True), \
            mock.patch.object(sinh_arcsinh, "_maybe_compiled", lambda fn, compiled: fn):
        yield


def snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
             for i, p in enumerate(params) if p in opt.state})


def assert_unchanged(before, params, opt):
    weights, state = before
    assert all(torch.equal(a, p.detach()) or (a.isnan() == p.isnan()).all() and
               torch.equal(a.nan_to_num(), p.detach().nan_to_num()) for a, p in zip(weights, params))
    now = snapshot(params, opt)[1]
    assert now.keys() == state.keys()
    for i in state:
        assert now[i].keys() == state[i].keys()
        for k in state[i]:
            assert torch.equal(now[i][k], state[i][k]), (i, k)


def assert_finite(params, opt):
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert v.isfinite().all(), f"parameter {i} ({p.dtype}, {tuple(p.shape)}): state {k!r} not finite"


def build(params, hyper, optimizer, path):
    kw = dict(hyper, generator=torch.Generator().manual_seed(0))
    if path == "single":
        kw["foreach"] = False
    elif path == "compiled":
        kw["compiled"] = True
    else:
        kw["compiled"] = False
    if optimizer == "advi":
        kw.pop("inner_steps")
        return ADVI(params, **kw)
    if optimizer in ("gsm", "bam"):   # closed forms: lr in [0, 1] for GSM; no Adam options
        for key in ("betas", "eps", "inner_steps", "compiled"):
            kw.pop(key, None)
        kw["lr"] = min(kw["lr"], 1.0)
        return (GSM if optimizer == "gsm" else BaM)(params, **kw)
    return ProxScoreOptimizer(params, family=optimizer, **kw)


@FUZZ
@given(scenarios())
def test_fuzz_steps_end_in_a_clear_error_a_skip_or_finite_state(scenario):
    specs, hyper, optimizer, path, with_closure, steps = scenario
    params = [make_param(kind, dtype, seed) for seed, (kind, dtype) in enumerate(specs)]
    with eager_compiled_path() if path == "compiled" else contextlib.nullcontext():
        before = [p.detach().clone() for p in params]
        try:
            opt = build(params, hyper, optimizer, path)
        except ValueError as error:  # e.g. "Invalid eps: 0.0 (...)", "GSM with covariance='dense' needs ..."
            assert len(str(error)) > 40, error
            assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))
            return
        for t, (magnitude, single) in enumerate(steps):
            def set_grads(t=t, magnitude=magnitude, single=single):
                for i, p in enumerate(params):
                    p.grad = make_grad(p, magnitude, single, 100 * t + i)
                return torch.tensor(0.0)

            if not with_closure:
                set_grads()
            before = snapshot(params, opt)
            skipped = opt.skipped_steps
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    opt.step(set_grads if with_closure else None)
                except RuntimeError as error:  # refused before anything changed
                    assert "ProxScoreOptimizer" in str(error) or "family" in str(error), error
                    assert_unchanged(before, params, opt)
                    continue
            if opt.skipped_steps > skipped:
                assert any("skipped a step" in str(w.message) for w in caught)
                assert_unchanged(before, params, opt)
            else:
                assert not any("skipped a step" in str(w.message) for w in caught)
            assert_finite(params, opt)
