"""Extreme but legal input: huge finite gradients, zero-element and 0-dim parameters, the dense
baselines' eigen-decompositions. Either the step runs and every state tensor stays finite, or it
is skipped with a warning naming the cause and nothing changes (issue 18, items 4 and 5)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_equal, assert_nested_equal, step_with, weights
from torch import nn

from torch_proxvi import GSM, BaM, ProxScoreOptimizer


def full_state(opt):
    return copy.deepcopy(opt.state_dict())


def posterior_state(saved):
    return {pid: {k: v for k, v in st.items() if k != "proxvi"} for pid, st in saved["state"].items()}


def state_tensors(opt):
    return [(i, k, v) for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
            for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)]


def assert_state_finite(opt):
    bad = [(i, k) for i, k, v in state_tensors(opt) if v.is_floating_point() and not v.isfinite().all()]
    assert not bad, f"non-finite state: {bad}"


def location(opt, p):
    """The posterior's location parameter of ``p`` (the Gaussians' ``mean``, the flows' ``loc``):
    cheaper than ``posterior_mean``, which is a Monte Carlo estimate for the dense flow."""
    state = opt.state[p]
    return (state["mean"] if "mean" in state else state["loc"]).clone()


def backward(model, x, y, big=None, where=(1, 2)):
    model.zero_grad()
    F.cross_entropy(model(x).float(), y).backward()
    if big is not None:
        with torch.no_grad():
            model[0].weight.grad[where] = big


# ---------------------------------------------------------------------------- item 4
@pytest.mark.parametrize(("dataset_size", "big"), [(1e6, 1e15), (32, 1e20), (64, -3e37)],
                         ids=["N1e6-g1e15", "N32-g1e20", "N64-g-3e37"])
def test_a_huge_finite_gradient_is_skipped_with_its_cause_and_freezes_nothing(make_opt, make_model, data,
                                                                                dataset_size, big):
    """The score N/T * grad would overflow Adam's second moment in float32: before the fix the
    moment became inf without a word and the weight's mean never moved again."""
    model = make_model()
    opt = make_opt(model.parameters(), dataset_size=dataset_size, lr=1e-3)
    x, y = data
    for _ in range(2):
        backward(model, x, y)
        opt.step()
    before, before_w = full_state(opt), weights(model)
    backward(model, x, y, big)
    with pytest.warns(RuntimeWarning, match=r"(?s)too large.*dataset_size / temperature") as rec:
        opt.step()
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert opt.skipped_steps == 1
    assert_all_equal(weights(model), before_w, "weights changed on a skipped step")
    assert_nested_equal(posterior_state(before), posterior_state(full_state(opt)), "state changed on a skipped step")
    assert_state_finite(opt)
    # the weight is not frozen: normal steps move its posterior mean
    mean = location(opt, model[0].weight)[1, 2].item()
    for _ in range(3):
        backward(model, x, y)
        opt.step()
    assert location(opt, model[0].weight)[1, 2].item() != mean
    assert_state_finite(opt)


@pytest.mark.parametrize("init_std", [1e-3, 30.0])
def test_a_large_gradient_under_the_skip_bound_keeps_every_state_finite(make_opt, make_model, data, init_std):
    """A score just under the bound is taken; products with it (the log-scale's u * s, the
    flows' residuals) may overflow, and Adam's gradient is bounded so its moments stay finite."""
    model = make_model()
    opt = make_opt(model.parameters(), dataset_size=1e6, lr=1e-3, init_std=init_std)
    x, y = data
    backward(model, x, y)
    opt.step()
    backward(model, x, y, 4e12)          # score 4e18: just under the bound
    opt.step()
    assert opt.skipped_steps == 0
    assert_state_finite(opt)
    mean = location(opt, model[0].weight)[1, 2].item()
    for _ in range(2):
        backward(model, x, y)
        opt.step()
    assert_state_finite(opt)
    if not isinstance(opt, (GSM, BaM)):  # their closed forms shrink the variance to ~score^-1: no move is due
        assert location(opt, model[0].weight)[1, 2].item() != mean, "the weight froze"
    assert all(p.isfinite().all() for p in model.parameters())


def test_a_huge_gradient_in_a_closure_sample_is_skipped_and_restores_everything(make_opt, make_model, data):
    model = make_model()
    opt = make_opt(model.parameters(), mc_samples=2, dataset_size=1e6)
    x, y = data
    calls = []

    def closure(poison=None):
        backward(model, x, y, 1e15 if len(calls) + 1 == poison else None)
        calls.append(1)
        return torch.tensor(0.0)

    opt.step(closure)
    before, before_w = full_state(opt), weights(model)
    poison = len(calls) + 2    # the step's second sample
    with pytest.warns(RuntimeWarning, match="too large"):
        opt.step(lambda: closure(poison))
    assert opt.skipped_steps == 1
    assert_all_equal(weights(model), before_w)
    assert_nested_equal(posterior_state(before), posterior_state(full_state(opt)))
    assert_state_finite(opt)


def test_a_non_finite_gradient_still_says_non_finite(make_model, data):
    model = make_model()
    opt = ProxScoreOptimizer(model.parameters(), dataset_size=64)
    backward(model, *data, float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite gradients") as rec:
        opt.step()
    assert "too large" not in str(rec[0].message)


# ---------------------------------------------------------------------------- item 5
class WithEmpty(nn.Module):
    """conftest's model plus a zero-element parameter that the loss touches (it gets a gradient)."""

    def __init__(self, model):
        super().__init__()
        self.net = model
        self.empty = nn.Parameter(torch.empty(0, 3))

    def forward(self, x):
        return self.net(x) + self.empty.sum()


@pytest.mark.parametrize("with_closure", [False, True], ids=["plain", "closure"])
def test_a_zero_element_parameter_trains(make_opt, make_model, data, with_closure):
    model = WithEmpty(make_model())
    opt = make_opt(model.parameters())
    x, y = data

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        if with_closure:
            opt.step(closure)
        else:
            closure()
            assert model.empty.grad is not None and model.empty.grad.numel() == 0
            opt.step()
    assert opt.skipped_steps == 0
    assert_state_finite(opt)
    assert opt.posterior_std(model.empty).shape == (0, 3)   # (the dense flow's is a Monte Carlo estimate)
    assert opt.predictive(model, x, n_samples=2).shape == (x.shape[0], 3)


def test_only_zero_element_parameters_step(make_opt):
    p = nn.Parameter(torch.empty(0))
    opt = make_opt([p])
    for _ in range(2):
        p.grad = torch.empty(0)
        opt.step()
    assert opt.skipped_steps == 0 and p.shape == (0,)


@pytest.mark.parametrize("with_closure", [False, True], ids=["plain", "closure"])
def test_dense_flow_with_a_0dim_parameter(make_model, data, with_closure):
    """A ``logit_scale``-like 0-dim parameter in a family="flow" group: before the fix the step
    raised after the state had already moved."""
    torch.manual_seed(0)
    head = nn.Linear(5, 3)
    scale = nn.Parameter(torch.tensor(1.0))
    opt = ProxScoreOptimizer([head.weight, head.bias, scale], lr=1e-2, dataset_size=64, family="flow",
                             flow_options={"transforms": 1, "hidden_features": (8,)})
    x, y = data

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x) * scale, y)
        loss.backward()
        return loss

    for _ in range(2):
        step_with(opt, closure, with_closure)
    assert_state_finite(opt)
    assert scale.shape == () and opt.posterior_mean(scale).shape == () and opt.posterior_std(scale).shape == ()
    assert opt.state[scale]["loc"].shape == ()


@pytest.mark.parametrize("cls", [GSM, BaM])
@pytest.mark.parametrize("big", [1e25, 1e17], ids=["1e25", "1e17"])
def test_dense_baseline_on_a_huge_gradient_skips_or_stays_finite(cls, big):
    """Before the fix ``eigh`` crashed (or the covariance became non-finite) after the state had
    moved. Now the step is skipped with a warning and nothing changes, or it stays finite."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3))
    opt = cls([p], dataset_size=10, covariance="dense", mc_samples=2, lr=1.0 if cls is BaM else 0.5)
    target = torch.randn(3)

    def closure(scale=1.0):
        opt.zero_grad()
        loss = ((p - target) ** 2).sum() * scale
        loss.backward()
        return loss

    opt.step(closure)
    before, before_w = full_state(opt), [p.detach().clone()]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.step(lambda: closure(big))
    if opt.skipped_steps:
        assert any("skipped" in str(w.message) for w in rec)
        assert_all_equal([p.detach()], before_w)
        assert_nested_equal(posterior_state(before), posterior_state(full_state(opt)))
    assert_state_finite(opt)
    for _ in range(2):   # trains on
        opt.step(closure)
    assert_state_finite(opt)
    assert p.isfinite().all()


def test_dense_baseline_failed_decomposition_skips_and_changes_nothing(monkeypatch):
    """A decomposition that fails inside the update (finite input, LAPACK gives up) skips the step."""
    from torch_proxvi.baselines import bam

    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3))
    opt = BaM([p], dataset_size=10, covariance="dense", mc_samples=2)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    before, before_w = full_state(opt), p.detach().clone()

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(bam, "symmetric_sqrt", fail)
    with pytest.warns(RuntimeWarning, match="eigh"):
        opt.step(closure)
    assert opt.skipped_steps == 1
    assert torch.equal(p.detach(), before_w)
    assert_nested_equal(posterior_state(before), posterior_state(full_state(opt)))
