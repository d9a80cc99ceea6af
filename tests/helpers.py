"""Helpers shared by the test modules: exact, bitwise comparisons and interleaved step timing."""

from __future__ import annotations

import math
import statistics
import time

import torch


def step_with(opt, closure, with_closure: bool):
    """One optimizer step the two ways a loop takes it: ``opt.step(closure)``, or ``closure()``
    then ``opt.step()``."""
    if with_closure:
        return opt.step(closure)
    loss = closure()
    opt.step()
    return loss


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def all_equal(xs, ys) -> bool:
    return len(xs) == len(ys) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        for x, y in zip(xs, ys, strict=True))


def assert_all_equal(xs, ys, msg="tensors differ"):
    assert all_equal(xs, ys), msg


def assert_not_all_equal(xs, ys, msg="tensors are all equal"):
    assert not all_equal(xs, ys), msg


def assert_nested_equal(a, b, path="state"):
    """Exact equality of nested state_dict-like structures; ``path`` names the first mismatch."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_nested_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_nested_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def median_step_times(opts: dict, steps: int, warmup: int) -> dict:
    """Median ``step()`` seconds of each optimizer, timed interleaved (one step of each in turn,
    so the machine's load affects all alike), after ``warmup`` untimed rounds."""
    times = {name: [] for name in opts}
    for i in range(warmup + steps):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
