"""Bad input: the right exception, a message naming the problem, and nothing half-done."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_equal, assert_nested_equal, assert_not_all_equal, weights
from torch import nn

from torch_proxvi import ProxScoreOptimizer

NAN, INF = float("nan"), float("inf")














def full_state(opt):
    """Everything the optimizer would save, deep-copied (state, groups, RNG, counters)."""
    return copy.deepcopy(opt.state_dict())


def posterior_state(saved):
    """The per-parameter state of a saved state_dict, without the optimizer-wide entries (RNG,
    counters) that ProxScoreOptimizer also keeps in its first parameter's state."""
    return {pid: {k: v for k, v in st.items() if k != "proxvi"} for pid, st in saved["state"].items()}


# ---------------------------------------------------------------------------- dataset_size
def test_missing_dataset_size_is_a_type_error_naming_it(make_model):
    with pytest.raises(TypeError, match="dataset_size"):
        ProxScoreOptimizer(make_model().parameters(), lr=1e-3)


@pytest.mark.parametrize("value", [0, -5, NAN, INF, "100"], ids=repr)
def test_bad_dataset_size(make_model, value):
    with pytest.raises(ValueError, match="dataset_size"):
        ProxScoreOptimizer(make_model().parameters(), lr=1e-3, dataset_size=value)


# ---------------------------------------------------------------------------- options
BAD_OPTIONS = [
    ("lr", -1), ("lr", NAN), ("lr", INF),
    ("prior_precision", 0), ("prior_precision", -1),
    ("init_std", 0),
    ("mc_samples", 0), ("mc_samples", 1.5), ("mc_samples", True),
    ("inner_steps", 0),
    ("prox_weight", -1),
    ("betas", (1.0, 0.9)), ("betas", (0.9,)),
    ("eps", -1),
    ("temperature", 0),
    ("family", "nope"), ("prior_mean", "nope"), ("mean_update", "nope"),
    ("warmup_steps", -1),
    ("scale_lr_ratio", -1),
    ("init_curvature", -1), ("init_curvature", NAN), ("init_curvature", INF), ("init_curvature", True),
    ("init_curvature", 1e300),                       # a start std of 1e-151: out of the state's range
    ("relative_init_curvature", -1), ("relative_init_curvature", NAN), ("relative_init_curvature", True),
    ("mean_update", "newton"),                       # the "solved" rule's, not the default rule's
    ("dataset_size", 0), ("dataset_size", -5), ("dataset_size", NAN), ("dataset_size", "100"),
    # values that passed and corrupted the state (issue 18, item 6)
    ("eps", 0), ("eps", 1e-45), ("eps", 1e-30),      # 0 / 0 at the first step: NaN weights
    ("init_std", 1e-24), ("init_std", 1e9),          # exp(2 log sigma) not a normal float32
    ("prior_precision", 1e39), ("prior_precision", 1e25),  # prior_precision * variance overflows
    ("dataset_size", 1e39), ("temperature", 1e-40),  # the score scale N / T is not a float32
]
BAD_IDS = [f"{k}={v!r}" for k, v in BAD_OPTIONS]


def names(option):
    """A regex that the error message must contain: the option's name."""
    return "lr|learning rate" if option == "lr" else re.escape(option)


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS, ids=BAD_IDS)
def test_bad_option_in_constructor(make_model, option, value):
    kw = {"dataset_size": 64, option: value}
    with pytest.raises(ValueError, match=names(option)):
        ProxScoreOptimizer(make_model().parameters(), **kw)


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS, ids=BAD_IDS)
def test_bad_option_in_param_group(make_model, option, value):
    model = make_model()
    groups = [{"params": model[0].parameters()},
              {"params": model[2].parameters(), option: value}]
    with pytest.raises(ValueError, match=names(option)):
        ProxScoreOptimizer(groups, lr=1e-3, dataset_size=64)


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS, ids=BAD_IDS)
def test_bad_option_in_add_param_group(make_model, data, train, option, value):
    model = make_model()
    opt = ProxScoreOptimizer(model[0].parameters(), lr=1e-2, dataset_size=64)
    x, y = data
    train(model, opt, x, y)
    before, before_w = full_state(opt), weights(model)
    group0 = list(opt.param_groups[0]["params"])
    with pytest.raises(ValueError, match=names(option)):
        opt.add_param_group({"params": model[2].parameters(), option: value})
    assert len(opt.param_groups) == 1, "the rejected group was kept"
    assert opt.param_groups[0]["params"] == group0
    assert_nested_equal(before, full_state(opt))
    assert_all_equal(weights(model), before_w)
    # the rejected parameters can still be added with valid options, and the optimizer works
    opt.add_param_group({"params": model[2].parameters()})
    train(model, opt, x, y)
    assert len(opt.param_groups) == 2 and model[2].weight in opt.state


# ---------------------------------------------------------------------------- parameter kinds
def test_complex_parameter_is_rejected():
    p = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        ProxScoreOptimizer([p], dataset_size=64)
    opt = ProxScoreOptimizer([nn.Parameter(torch.randn(3))], dataset_size=64)
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 5, sparse=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x, tokens=None):
        h = x if tokens is None else x + self.emb(tokens)
        return self.head(h)


@pytest.mark.parametrize("with_closure", [False, True], ids=["plain", "closure"])
def test_sparse_gradient_is_rejected_and_changes_nothing(make_opt, data, with_closure):
    model = WithEmbedding()
    if make_opt.joint:  # the embedding is unused at first: a joint group cannot hold it
        opt = make_opt([{"params": model.head.parameters()},
                        {"params": model.emb.parameters(), "family": "gaussian"}])
    else:
        opt = make_opt(model.parameters())
    x, y = data
    tokens = torch.arange(x.shape[0]) % 10
    for _ in range(2):  # train the dense part (the embedding is unused, so grad None)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    before, before_w = full_state(opt), weights(model)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x, tokens), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse"):
        if with_closure:
            opt.step(closure)
        else:
            closure()
            assert model.emb.weight.grad.is_sparse
            opt.step()
    assert_all_equal(weights(model), before_w, "a rejected step changed the weights")
    assert_nested_equal(before, full_state(opt), "a rejected step changed the optimizer state")


# ---------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_non_finite_gradient_skips_the_step(make_opt, make_model, data, train, bad):
    model = make_model()
    opt = make_opt(model.parameters())
    x, y = data
    for _ in range(2):
        train(model, opt, x, y)
    assert opt.skipped_steps == 0
    for count in (1, 2):
        before, before_w = full_state(opt), weights(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            model[0].weight.grad[1, 2] = bad
        with pytest.warns(RuntimeWarning, match=rf"(?s)non-finite.*\b{count}\b") as rec:
            opt.step()
        assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
        assert opt.skipped_steps == count
        assert_all_equal(weights(model), before_w, "weights changed on a skipped step")
        after = full_state(opt)
        assert_nested_equal(posterior_state(before), posterior_state(after), "state changed on a skipped step")
        assert_nested_equal(before["param_groups"], after["param_groups"])
    # the optimizer is not stuck: a finite step trains again
    before_w = weights(model)
    train(model, opt, x, y)
    assert_not_all_equal(weights(model), before_w)
    assert opt.skipped_steps == 2


@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_non_finite_gradient_in_a_closure_sample_restores_the_weights(make_opt, make_model, data,
                                                                      bad):
    model = make_model()
    opt = make_opt(model.parameters(), mc_samples=2)
    x, y = data
    calls = []

    def closure(poison_call=None):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        calls.append(1)
        if len(calls) == poison_call:
            with torch.no_grad():
                model[2].weight.grad[0, 0] = bad
        return loss

    for _ in range(2):
        opt.step(closure)
    before, before_w = full_state(opt), weights(model)
    calls.clear()
    with pytest.warns(RuntimeWarning, match=r"(?s)non-finite.*\b1\b"):
        opt.step(lambda: closure(poison_call=2))
    assert len(calls) == 2
    assert opt.skipped_steps == 1
    assert_all_equal(weights(model), before_w, "weights not restored after a skipped step")
    after = full_state(opt)
    assert_nested_equal(posterior_state(before), posterior_state(after), "state changed on a skipped step")


# ---------------------------------------------------------------------------- load_state_dict
def trained_opt(model, make_opt, data, train, **kw):
    opt = make_opt(model.parameters(), **kw)
    for _ in range(2):
        train(model, opt, *data)
    return opt


def test_load_state_dict_of_another_model_is_rejected_whole(make_opt, make_model, data, train):
    # same number of parameters; the first layer even matches, the second does not
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
    y4 = data[1] % 4
    sd_other = trained_opt(other, make_opt, (data[0], y4), train, lr=0.5).state_dict()
    model = make_model()
    opt = trained_opt(model, make_opt, data, train)
    before, before_w = full_state(opt), weights(model)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd_other)
    assert_nested_equal(before, full_state(opt), "load_state_dict half-loaded a bad state_dict")
    assert opt.param_groups[0]["lr"] != 0.5
    assert_all_equal(weights(model), before_w)


def test_load_state_dict_from_adam_is_rejected(make_opt, make_model, data, train):
    model = make_model()
    adam = torch.optim.Adam(model.parameters(), lr=0.5)
    train(model, adam, *data)
    opt = trained_opt(model, make_opt, data, train)
    before = full_state(opt)
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict(adam.state_dict())
    assert_nested_equal(before, full_state(opt))


def test_load_state_dict_with_other_number_of_groups_is_rejected(make_opt, make_model, data,
                                                               train):
    model_a = make_model()
    opt_a = make_opt([{"params": model_a[0].parameters()},
                      {"params": model_a[2].parameters(), "lr": 0.5}])
    for _ in range(2):
        train(model_a, opt_a, *data)
    model = make_model()
    opt = trained_opt(model, make_opt, data, train)
    before = full_state(opt)
    with pytest.raises(ValueError, match="group"):
        opt.load_state_dict(opt_a.state_dict())
    assert_nested_equal(before, full_state(opt))


# ---------------------------------------------------------------------------- lookups
def test_posterior_of_a_foreign_tensor_is_rejected(make_opt, make_model, data, train):
    model = make_model()
    opt = trained_opt(model, make_opt, data, train)
    before = full_state(opt)
    for t in (torch.zeros(8, 5), model[0].weight.detach().clone(),
              nn.Linear(5, 8).weight):
        with pytest.raises(ValueError, match="optimizer"):
            opt.posterior_mean(t)
        with pytest.raises(ValueError, match="optimizer"):
            opt.posterior_std(t)
    assert_nested_equal(before, full_state(opt))


@pytest.mark.parametrize(("kw", "name"), [({"n_samples": 0}, "n_samples"),
                                          ({"n_samples": 2.5}, "n_samples"),
                                          ({"n_samples": True}, "n_samples"),
                                          ({"n_samples": 4.0}, "n_samples"),
                                          ({"likelihood": "nope"}, "likelihood")])
def test_predictive_bad_arguments(make_opt, make_model, data, train, kw, name):
    model = make_model()
    opt = trained_opt(model, make_opt, data, train)
    before_w = weights(model)
    with pytest.raises(ValueError, match=name):
        opt.predictive(model, data[0], **kw)
    assert_all_equal(weights(model), before_w)


def test_predictive_accepts_integral_numbers(make_opt, make_model, data, train):
    import numpy as np

    model = make_model()
    opt = trained_opt(model, make_opt, data, train)
    for n in (np.int64(2), np.int32(2), 2):
        assert opt.predictive(model, data[0], n_samples=n).shape == (data[0].shape[0], 3)


# ---------------------------------------------------------------------------- loose types, flow options
@pytest.mark.parametrize(("option", "value"), [("compiled", "no"), ("compiled", 1), ("foreach", "no"),
                                               ("foreach", 0), ("generator", 42), ("generator", "cpu")],
                         ids=repr)
def test_optimizer_wide_switches_are_typed(make_model, option, value):
    model = make_model()
    before_rng = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=rf"Invalid {option}: .*(True, False or None|torch.Generator or None)"):
        ProxScoreOptimizer(model.parameters(), dataset_size=64, **{option: value})
    assert torch.equal(before_rng, torch.random.get_rng_state()), "a refused construction drew from the RNG"


BAD_FLOW_OPTIONS = [("lr_ratio", NAN), ("lr_ratio", INF), ("lr_ratio", -0.1), ("lr_ratio", "0.1"),
                    ("bins", 0), ("bins", 1.5), ("bins", True), ("transforms", 0), ("transforms", -1),
                    ("transforms", 2.0), ("hidden_features", (0,)), ("hidden_features", ()),
                    ("hidden_features", "32"), ("hidden_features", (8.5,)), ("delay", -1)]


@pytest.mark.parametrize(("key", "value"), BAD_FLOW_OPTIONS, ids=[f"{k}={v!r}" for k, v in BAD_FLOW_OPTIONS])
def test_bad_flow_options_name_the_option(make_model, key, value):
    model = make_model()
    with pytest.raises(ValueError, match=rf"Invalid flow_options\['{key}'\]"):
        ProxScoreOptimizer(model[2].parameters(), dataset_size=64, family="flow", flow_options={key: value})
    opt = ProxScoreOptimizer(model[0].parameters(), dataset_size=64)
    with pytest.raises(ValueError, match=rf"Invalid flow_options\['{key}'\]"):
        opt.add_param_group({"params": model[2].parameters(), "family": "flow", "flow_options": {key: value}})
    assert len(opt.param_groups) == 1
