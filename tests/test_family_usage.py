"""Choosing families per parameter group, and the errors that refuse a family where it cannot work.

(The generic contract suite runs every family too: see ``OPTIMIZERS`` in conftest.py.)
"""

from __future__ import annotations

import io
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import build_data, build_model

from torch_proxvi import ADVI, GSM, ProxScoreOptimizer
from torch_proxvi.families import flow


def _mixed(model, **kw):
    """Gaussian body, dense flow head: the per-group choice of the issue."""
    return ProxScoreOptimizer([{"params": model[0].parameters(), "family": "gaussian"},
                               {"params": model[2].parameters(), "family": "flow"}],
                              lr=1e-2, dataset_size=64, **kw)


def _train(model, opt, steps=5):
    x, y = build_data()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_per_group_families_keep_their_own_state_and_the_body_goes_through_the_dispatcher(monkeypatch):
    from torch_proxvi.kernels import dispatch

    model = build_model()
    opt = _mixed(model)
    body_reference = build_model()
    reference = ProxScoreOptimizer(body_reference[0].parameters(), lr=1e-2, dataset_size=64)
    stepped = []
    real = dispatch.step
    monkeypatch.setattr(dispatch, "step", lambda params, *a, **k: stepped.extend(params) or real(params, *a, **k))
    _train(model, opt)
    # the Gaussian body goes through the kernels' dispatcher, the flow head does not
    assert {id(p) for p in stepped} == {id(p) for p in model[0].parameters()}
    assert set(opt.state[model[0].weight]) >= {"mean", "log_scale"}
    assert "flow" in opt.state[model[2].weight] and "flow" not in opt.state[model[2].bias]
    assert "loc" in opt.state[model[2].bias]
    flow_weights = opt.state[model[2].weight]["flow"]
    assert flow_weights.abs().max() > 0  # the flow left the identity
    # the body's mean moved as much as a body-only optimizer's (same lr, same kind of update)
    _train(body_reference, reference)
    moved = (opt.state[model[0].weight]["mean"] - build_model()[0].weight).abs().mean()
    moved_ref = (reference.state[body_reference[0].weight]["mean"] - build_model()[0].weight).abs().mean()
    assert 0.5 < float(moved.detach() / moved_ref.detach()) < 2.0


def test_mixed_families_resume_exactly_from_a_state_dict():
    x, y = build_data()
    model_a, model_b = build_model(), build_model()
    opt_a = _mixed(model_a)
    _train(model_a, opt_a, 3)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_b.load_state_dict(saved["model"])
    opt_b = _mixed(model_b)
    opt_b.load_state_dict(saved["opt"])
    _train(model_a, opt_a, 3)
    _train(model_b, opt_b, 3)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key


def test_mean_params_and_posterior_summaries_use_each_family():
    model = build_model()
    opt = _mixed(model)
    _train(model, opt, 3)
    head = model[2].weight
    with opt.mean_params():
        assert torch.equal(model[0].weight.detach(), opt.state[model[0].weight]["mean"])
        assert torch.allclose(head.detach(), opt.posterior_mean(head))
    # the flow head's mean is a Monte Carlo estimate near its location (the flow is near identity)
    assert torch.allclose(opt.posterior_mean(head), opt.state[head]["loc"], atol=5e-4)
    assert torch.allclose(opt.posterior_std(head), opt.state[head]["log_scale"].exp(), rtol=0.1)
    probs = opt.predictive(model, build_data()[0], n_samples=4)
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs)))


# ---------------------------------------------------------------------------- refusals
def test_a_flow_group_above_the_limit_is_refused_naming_the_limit_and_the_alternatives():
    big = torch.nn.Linear(200, 101)  # 20301 weights
    with pytest.raises(ValueError, match=r"limited to 20000 .*elementwise_flow"):
        ProxScoreOptimizer(big.parameters(), dataset_size=10, family="flow")
    opt = ProxScoreOptimizer(torch.nn.Linear(3, 2).parameters(), dataset_size=10)
    with pytest.raises(ValueError, match="limited to"):
        opt.add_param_group({"params": big.parameters(), "family": "flow"})
    assert len(opt.param_groups) == 1


def test_score_mean_update_is_refused_for_the_dense_flow():
    with pytest.raises(ValueError, match="mean_update.*leave mean_update=None"):
        ProxScoreOptimizer(build_model().parameters(), dataset_size=10, family="flow", mean_update="score")


def test_unknown_family_and_flow_options_are_refused():
    with pytest.raises(ValueError, match="Invalid family: 'spline'.*elementwise_flow"):
        ProxScoreOptimizer(build_model().parameters(), dataset_size=10, family="spline")
    with pytest.raises(ValueError, match="Invalid flow_options"):
        ProxScoreOptimizer(build_model().parameters(), dataset_size=10, family="flow", flow_options=3)
    with pytest.raises(ValueError, match="keys among"):
        ProxScoreOptimizer(build_model().parameters(), dataset_size=10, family="flow",
                           flow_options={"layers": 3})


@pytest.mark.parametrize("cls, message", [
    (ADVI, "Invalid rule: 'elbo' \\(family='elementwise_flow' supports \\('proximal',\\)"),  # a Gaussian rule
    (GSM, "Invalid family: 'elementwise_flow' \\(GSM fits a Gaussian"),                       # its own family
])
def test_the_gaussian_baselines_refuse_other_families(cls, message):
    model = build_model()
    with pytest.raises(ValueError, match=message):
        cls([{"params": model.parameters(), "family": "elementwise_flow"}], dataset_size=10)


def test_flow_without_zuko_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "zuko", None)
    monkeypatch.setattr(flow, "_TEMPLATES", {})
    with pytest.raises(ImportError, match="pip install zuko"):
        ProxScoreOptimizer(build_model().parameters(), dataset_size=10, family="flow")


def test_scale_lr_ratio_defaults_to_each_familys_own():
    # None (the default) resolves per family: the dense flow's log-scales learn 10x faster, so
    # that its scale, not its network, grows from a small init_std (docs/benchmarks.md)
    model = build_model()
    groups = [{"params": model[0].parameters(), "family": "gaussian"},
              {"params": [model[2].weight], "family": "flow"},
              {"params": [model[2].bias], "family": "elementwise_flow"}]
    opt = ProxScoreOptimizer(groups, dataset_size=64)
    assert [g["scale_lr_ratio"] for g in opt.param_groups] == [1.0, 10.0, 1.0]
    opt = ProxScoreOptimizer(build_model().parameters(), dataset_size=64, family="flow", scale_lr_ratio=2.0)
    assert opt.param_groups[0]["scale_lr_ratio"] == 2.0
    with pytest.raises(ValueError, match="scale_lr_ratio"):
        ProxScoreOptimizer(build_model().parameters(), dataset_size=64, scale_lr_ratio=-1.0)


def test_the_dense_flows_network_waits_delay_steps_while_location_and_scale_learn():
    model = build_model()
    opt = ProxScoreOptimizer([{"params": model[2].parameters(), "family": "flow"}], lr=1e-2, dataset_size=64,
                             flow_options={"delay": 3})
    head = model[2].weight
    x, y = build_data()
    seen = []
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {k: opt.state[head][k].clone() for k in ("flow", "loc", "log_scale")} if head in opt.state else None
        opt.step()
        if before is not None:
            seen.append({k: not torch.equal(before[k], opt.state[head][k]) for k in before})
    # steps 2 and 3 (the first creates the state) are within the delay, steps 4 and 5 after it
    assert seen == [{"flow": False, "loc": True, "log_scale": True}] * 2 + [{"flow": True, "loc": True,
                                                                               "log_scale": True}] * 2
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="delay"):
            ProxScoreOptimizer(build_model().parameters(), dataset_size=64, family="flow", flow_options={"delay": bad})
