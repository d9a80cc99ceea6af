"""The torch.optim + Bayesian contract that every optimizer of ``conftest.OPTIMIZERS`` meets.

Each test is parametrised over the table through the ``make_opt`` fixture, and uses only the
public API of DESIGN.md section 2 (plus ``opt.state`` / ``state_dict`` as in torch.optim).
"""

from __future__ import annotations

import copy
import io
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_equal, assert_nested_equal, assert_not_all_equal, step_with, weights
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

# Shapes of conftest's model and data: x is [BATCH, N_FEATURES], logits [BATCH, N_CLASSES].
BATCH, N_FEATURES, N_HIDDEN, N_CLASSES = 16, 5, 8, 3


def params_of(model):
    return list(model.parameters())




def means(opt, model):
    return [opt.posterior_mean(p).clone() for p in model.parameters()]


def stds(opt, model):
    return [opt.posterior_std(p).clone() for p in model.parameters()]










# ---------------------------------------------------------------------------- param groups
def test_param_groups_with_different_lr(make_opt, make_model, data, train):
    model = make_model()
    frozen, moving = model[0], model[2]
    opt = make_opt([{"params": frozen.parameters(), "lr": 0.0},
                    {"params": moving.parameters(), "lr": 5e-2}])
    x, y = data
    train(model, opt, x, y)  # creates the state
    frozen_mean, frozen_std = means(opt, frozen), stds(opt, frozen)
    moving_mean = means(opt, moving)
    for _ in range(3):
        train(model, opt, x, y)
    assert_all_equal(means(opt, frozen), frozen_mean, "lr=0 group: posterior mean moved")
    assert_all_equal(stds(opt, frozen), frozen_std, "lr=0 group: posterior std moved")
    for before, after in zip(moving_mean, means(opt, moving), strict=True):
        assert not torch.equal(before, after), "the lr>0 group's posterior mean did not move"
    assert opt.param_groups[0]["lr"] == 0.0 and opt.param_groups[1]["lr"] == 5e-2


def test_add_param_group_after_steps(make_opt, make_model, data, train):
    model = make_model()
    head = list(model[2].parameters())
    opt = make_opt(model[0].parameters())
    x, y = data
    for _ in range(3):
        train(model, opt, x, y)
    assert not any(p in opt.state and bool(opt.state[p]) for p in head)
    before_add = [w.clone() for w in head]
    opt.add_param_group({"params": head, "lr": 5e-2})
    assert len(opt.param_groups) == 2
    new_group = opt.param_groups[1]
    assert new_group["lr"] == 5e-2
    # the defaults fill the keys the new group did not give
    assert new_group["dataset_size"] == opt.param_groups[0]["dataset_size"]
    for _ in range(2):
        train(model, opt, x, y)
    for p, w0 in zip(head, before_add, strict=True):
        has_state = p in opt.state and bool(opt.state[p])
        assert has_state, "the added group got no state"
        assert not torch.equal(opt.posterior_mean(p), w0.to(opt.posterior_mean(p).dtype)), (
            "the added group's posterior mean was not updated")


# ---------------------------------------------------------------------------- grad is None
class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(N_FEATURES, N_CLASSES)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("with_closure", [False, True], ids=["plain", "closure"])
def test_param_without_grad_keeps_weights_and_gets_no_state(make_opt, data, with_closure):
    model = WithUnused()
    opt = make_opt(model.parameters())
    x, y = data
    unused_before = weights(model.unused)
    used_before = weights(model.used)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if make_opt.joint:  # refused, with nothing changed
        with pytest.raises(RuntimeError, match="needs a gradient for every one"):
            step_with(opt, closure, with_closure)
        assert_all_equal(weights(model.used), used_before, "a refused step changed the weights")
        assert_all_equal(weights(model.unused), unused_before, "a refused step changed the weights")
        assert not any(opt.state.get(p) for p in model.parameters()), "a refused step made state"
        return
    for _ in range(3):
        step_with(opt, closure, with_closure)
        assert all(p.grad is None for p in model.unused.parameters())
    assert_all_equal(weights(model.unused), unused_before, "a grad=None parameter was changed")
    for p in model.unused.parameters():
        has_state = p in opt.state and bool(opt.state[p])
        assert not has_state, "a grad=None parameter got state"
    assert_not_all_equal(weights(model.used), used_before)  # the used ones did train


# ---------------------------------------------------------------------------- closure
def test_step_with_closure_returns_loss_and_calls_closure_mc_samples_times(make_opt, make_model,
                                                                          data):
    model = make_model()
    opt = make_opt(model.parameters(), mc_samples=3)
    x, y = data
    losses = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.detach())
        return loss

    loss = opt.step(closure)
    assert len(losses) == 3
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss.float(), torch.stack(losses).float().mean())
    # the three samples differ, so the three losses do too
    assert len({float(v) for v in losses}) == 3
    opt.step(closure)
    assert len(losses) == 6


# ---------------------------------------------------------------------------- schedulers
def test_step_lr_scheduler_changes_lr_and_step_uses_it(make_opt, make_model, data, train):
    model = make_model()
    opt = make_opt(model.parameters(), lr=1e-2)
    sched = StepLR(opt, step_size=2, gamma=0.0)
    x, y = data
    history = []
    for _ in range(2):
        before = means(opt, model) if all(p in opt.state for p in model.parameters()) else None
        train(model, opt, x, y)
        sched.step()
        history.append(opt.param_groups[0]["lr"])
        if before is not None:
            assert_not_all_equal(means(opt, model), before, "lr > 0 but the mean did not move")
    assert history == [1e-2, 0.0]
    frozen = means(opt, model)
    for _ in range(3):
        train(model, opt, x, y)
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    assert_all_equal(means(opt, model), frozen, "the scheduler's lr=0 was not used by step()")


def test_reduce_lr_on_plateau(make_opt, make_model, data, train):
    model = make_model()
    opt = make_opt(model.parameters(), lr=1e-2)
    sched = ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0)
    x, y = data
    for metric in (1.0, 2.0, 3.0):  # getting worse: halve the lr after each non-improvement
        train(model, opt, x, y)
        sched.step(metric)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    before = means(opt, model)
    train(model, opt, x, y)
    after = means(opt, model)
    assert all(torch.isfinite(m).all() for m in after)
    assert_not_all_equal(after, before)


# ---------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("with_closure", [False, True], ids=["plain", "closure"])
def test_state_dict_roundtrip_continues_in_lockstep(make_opt, make_model, make_data,
                                                   with_closure):
    def run(model, opt, seed):
        x, y = make_data(seed)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        step_with(opt, closure, with_closure)

    kw = {"mc_samples": 2} if with_closure else {}
    model_a = make_model(seed=0)
    opt_a = make_opt(model_a.parameters(), **kw)
    for i in range(5):
        run(model_a, opt_a, seed=100 + i)

    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model_b = make_model(seed=12345)  # different weights and a different torch seed
    opt_b = make_opt(model_b.parameters(), **kw)
    assert_not_all_equal(weights(model_b), weights(model_a))
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert_all_equal(weights(model_b), weights(model_a))
    assert_all_equal(means(opt_b, model_b), means(opt_a, model_a))
    assert_all_equal(stds(opt_b, model_b), stds(opt_a, model_a))

    for i in range(5):
        run(model_a, opt_a, seed=200 + i)
        run(model_b, opt_b, seed=200 + i)
        assert_all_equal(weights(model_b), weights(model_a), f"weights diverged at step {i}")
    assert_all_equal(means(opt_b, model_b), means(opt_a, model_a))
    assert_all_equal(stds(opt_b, model_b), stds(opt_a, model_a))


def _resume(make_opt, make_model, make_data, train, steps_before, edit=lambda sd: None):
    """Train ``steps_before`` steps, save (``edit`` changes a copy of the state_dict), load into a
    fresh optimizer of another model seed; 3 more steps of both agree bit for bit. Returns the
    resumed (model, optimizer) and the uninterrupted one."""
    model_a = make_model(seed=0)
    opt_a = make_opt(model_a.parameters())
    for i in range(steps_before):
        train(model_a, opt_a, *make_data(100 + i))
    sd = copy.deepcopy(opt_a.state_dict())  # torch's state_dict holds the live state
    edit(sd)
    model_b = make_model(seed=12345)
    opt_b = make_opt(model_b.parameters())
    model_b.load_state_dict(model_a.state_dict())
    opt_b.load_state_dict(sd)
    for i in range(3):
        train(model_a, opt_a, *make_data(200 + i))
        train(model_b, opt_b, *make_data(200 + i))
        assert_all_equal(weights(model_b), weights(model_a), f"weights diverged at step {i}")
    return (model_b, opt_b), (model_a, opt_a)


def test_state_dict_of_a_fresh_optimizer_loads_and_continues_in_lockstep(make_opt, make_model, make_data, train):
    _resume(make_opt, make_model, make_data, train, steps_before=0)


@pytest.mark.parametrize("steps_before", [0, 2], ids=["fresh", "trained"])
def test_a_key_that_is_not_a_parameter_is_copied_through(make_opt, make_model, make_data, train, steps_before):
    """torch keeps ``optimizer.state`` entries that are not parameters (hooks store metadata
    there): state_dict crashed on them ('int' object is not a mapping, before a step; 'bool' is not
    iterable, after)."""
    def edit(sd):
        assert sd["state"]["meta"] == 3 and sd["state"]["flag"] is True

    def factory(params, **kw):
        opt = make_opt(params, **kw)
        opt.state["meta"] = 3
        opt.state["flag"] = True
        return opt

    (_, opt_b), _ = _resume(factory, make_model, make_data, train, steps_before, edit)
    assert opt_b.state["meta"] == 3 and opt_b.state["flag"] is True


def test_a_step_stored_as_a_python_number_loads_and_advances(make_opt, make_model, make_data, train):
    """The older torch format that torch's optimizers still accept: it crashed the flat path and
    never advanced on the single one (so warm-up never ended)."""
    def edit(sd):
        for entry in sd["state"].values():
            entry["step"] = entry["step"].item()

    (model_b, opt_b), (model_a, opt_a) = _resume(make_opt, make_model, make_data, train, 2, edit)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.is_tensor(opt_b.state[q]["step"]) and torch.equal(opt_b.state[q]["step"], opt_a.state[p]["step"])


def test_state_dict_and_load_state_dict_hooks_run_as_torchs(make_opt, make_model, make_data, train):
    """The hooks of torch.optim.Optimizer: state_dict pre/post, load_state_dict pre (a returned
    dict replaces the state_dict)/post, each seeing the optimizer's complete state_dict."""
    model = make_model(seed=0)
    opt = make_opt(model.parameters())
    train(model, opt, *make_data(1))
    seen = {}

    def pre(optimizer):
        optimizer.state["test"] = 1

    def post(optimizer, sd):
        seen["post"] = "proxvi" in sd and sd["state"].pop("test") == 1
        sd["ran_state_dict_pre_hook"] = True
        return sd

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = copy.deepcopy(opt.state_dict())
    assert seen["post"] and sd["ran_state_dict_pre_hook"] and "test" not in sd["state"]

    model_b = make_model(seed=1)
    opt_b = make_opt(model_b.parameters())

    def load_pre1(optimizer, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002

    def load_pre2(optimizer, state_dict):
        mine = copy.deepcopy(state_dict)
        mine["param_groups"][0]["lr"] = 0.003 if mine["param_groups"][0]["lr"] == 0.002 else -1
        return mine

    def load_post(optimizer):
        optimizer.state["ran_load_state_dict_post_hook"] = optimizer.param_groups[0]["lr"] == 0.003

    opt_b.register_load_state_dict_pre_hook(load_pre1)
    opt_b.register_load_state_dict_pre_hook(load_pre2)
    opt_b.register_load_state_dict_post_hook(load_post)
    opt_b.load_state_dict(sd)
    assert opt_b.state["ran_load_state_dict_post_hook"] is True
    opt_b.state_dict()  # a non-parameter key set by a hook: still fine
    model_b.load_state_dict(model.state_dict())
    train(model_b, opt_b, *make_data(2))


def test_deepcopy_gives_an_independent_optimizer(make_opt, make_model, make_data, train,
                                                 state_snapshot, same_state):
    def build():
        model = make_model(seed=0)
        opt = make_opt(model.parameters())
        for i in range(2):
            train(model, opt, *make_data(i))
        return model, opt

    model, opt = build()
    twin_model, twin_opt = build()  # an identical run that is never copied
    assert_all_equal(weights(model), weights(twin_model))

    model_c, opt_c = copy.deepcopy((model, opt))
    assert opt_c.param_groups[0]["params"][0] is next(model_c.parameters())
    before_state, before_weights = state_snapshot(opt), weights(model)
    for i in range(3):
        train(model_c, opt_c, *make_data(10 + i))
    assert_not_all_equal(weights(model_c), before_weights)  # the copy did train
    same_state(before_state, state_snapshot(opt))
    assert_all_equal(weights(model), before_weights)

    # the original's RNG was not shared with the copy: it continues exactly like its twin
    train(model, opt, *make_data(50))
    train(twin_model, twin_opt, *make_data(50))
    assert_all_equal(weights(model), weights(twin_model))
    assert_all_equal(means(opt, model), means(twin_opt, twin_model))


# ---------------------------------------------------------------------------- bf16
def shaped_state(opt, p):
    """The state tensors that have the parameter's shape (the variational parameters etc.)."""
    return {k: v for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}


def test_bf16_weights_keep_float32_state(make_opt, make_model, data, train):
    lr = make_opt.small_lr  # 5 steps move a weight far below bf16's spacing (~1e-3 near 0.3)
    model = make_model(dtype=torch.bfloat16)
    opt = make_opt(model.parameters(), lr=lr)
    x, y = data
    x = x.bfloat16()
    train(model, opt, x, y)
    first = means(opt, model)
    for _ in range(4):
        train(model, opt, x, y)
    moved, invisible = [], []
    for p, m0 in zip(model.parameters(), first, strict=True):
        assert p.dtype == torch.bfloat16
        m = opt.posterior_mean(p)
        assert m.dtype == torch.float32 and m.shape == p.shape
        assert opt.posterior_std(p).dtype == torch.float32
        moved.append((m != m0).flatten())
        invisible.append((m.bfloat16() == m0.bfloat16()).flatten())
        st = shaped_state(opt, p)
        assert st, "no per-weight state"
        for k, v in st.items():
            assert v.dtype == torch.float32, (k, v.dtype)
        for k in ("mean", "log_scale"):
            if k in opt.state[p]:
                assert opt.state[p][k].dtype == torch.float32
    moved, invisible = torch.cat(moved), torch.cat(invisible)
    assert moved.float().mean() > 0.9, "the posterior mean did not move"
    # a bf16 copy of the mean would not have changed for most weights: the float32 mean did
    assert (moved & invisible).float().mean() > 0.5, (
        "small updates were lost: the posterior mean is not accumulated in float32")
    assert any((opt.posterior_mean(p) != opt.posterior_mean(p).bfloat16().float()).any()
               for p in model.parameters())

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    model_b = make_model(seed=3, dtype=torch.bfloat16)
    opt_b = make_opt(model_b.parameters(), lr=lr)
    opt_b.load_state_dict(sd)
    for p, q in zip(model.parameters(), model_b.parameters(), strict=True):
        st_a, st_b = shaped_state(opt, p), shaped_state(opt_b, q)
        assert st_a.keys() == st_b.keys()
        for k in st_a:
            assert st_b[k].dtype == torch.float32, (k, st_b[k].dtype)
            assert torch.equal(st_a[k], st_b[k]), k
        assert torch.equal(opt_b.posterior_mean(q), opt.posterior_mean(p))


# ---------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_equals_full_batch(make_opt, make_model, data):
    x, y = data
    x = x.double()
    model_full = make_model(seed=0, dtype=torch.float64)
    opt_full = make_opt(model_full.parameters())
    model_acc = make_model(seed=0, dtype=torch.float64)
    opt_acc = make_opt(model_acc.parameters())
    half = BATCH // 2
    for _ in range(3):
        opt_full.zero_grad()
        F.cross_entropy(model_full(x), y).backward()
        opt_full.step()

        opt_acc.zero_grad()
        (F.cross_entropy(model_acc(x[:half]), y[:half]) / 2).backward()
        (F.cross_entropy(model_acc(x[half:]), y[half:]) / 2).backward()
        opt_acc.step()
    for a, b in zip(weights(model_acc), weights(model_full), strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(means(opt_acc, model_acc), means(opt_full, model_full), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(stds(opt_acc, model_acc), stds(opt_full, model_full), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- contexts
class Boom(Exception):
    pass


def test_mean_params_swaps_in_the_mean_and_restores(trained):
    model, opt = trained
    sample = weights(model)
    with opt.mean_params():
        for p in model.parameters():
            assert torch.equal(p, opt.posterior_mean(p).to(p.dtype))
        assert_not_all_equal(weights(model), sample)
    assert_all_equal(weights(model), sample)

    with pytest.raises(Boom):
        with opt.mean_params():
            inside = weights(model)
            raise Boom
    assert_not_all_equal(inside, sample)
    assert_all_equal(weights(model), sample, "weights not restored after an exception")


def test_sampled_params_draws_a_new_sample_and_restores(trained):
    model, opt = trained
    sample = weights(model)
    mean = [m.to(p.dtype) for m, p in zip(means(opt, model), model.parameters(), strict=True)]
    with opt.sampled_params():
        inside = weights(model)
        for a, b, m in zip(inside, sample, mean, strict=True):
            assert not torch.equal(a, b), "sampled_params did not draw a new sample"
            assert not torch.equal(a, m), "sampled_params wrote the mean, not a sample"
    assert_all_equal(weights(model), sample)

    with pytest.raises(Boom):
        with opt.sampled_params():
            inside = weights(model)
            raise Boom
    assert_not_all_equal(inside, sample)
    assert_all_equal(weights(model), sample, "weights not restored after an exception")


def test_eval_holds_the_mean_and_train_restores_the_sample(trained, data):
    model, opt = trained
    x, y = data
    sample = weights(model)
    opt.eval()
    for p in model.parameters():
        assert torch.equal(p, opt.posterior_mean(p).to(p.dtype))
    in_eval = weights(model)
    with warnings.catch_warnings():                      # saving in eval mode is exact: silent
        warnings.simplefilter("error")
        before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="eval"):
        opt.step()
    assert_all_equal(weights(model), in_eval)
    assert_nested_equal(before, opt.state_dict())
    opt.eval()  # idempotent: must not overwrite the saved training sample
    opt.train()
    assert_all_equal(weights(model), sample, "train() did not restore the training sample")
    opt.train()  # idempotent
    assert_all_equal(weights(model), sample)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # allowed again
    assert_not_all_equal(weights(model), sample)


# ---------------------------------------------------------------------------- predictive
class DictModel(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, features):
        return self.net(features)


class LogitsModel(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return types.SimpleNamespace(logits=self.net(x), hidden=None)


def test_predictive_classification(trained, data):
    model, opt = trained
    x, y = data
    assert x.shape == (BATCH, N_FEATURES)
    before_w = weights(model)
    before_sd = copy.deepcopy(opt.state_dict())
    probs = opt.predictive(model, x, n_samples=8, generator=torch.Generator().manual_seed(7))
    assert probs.shape == (BATCH, N_CLASSES)
    assert torch.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(BATCH, dtype=probs.dtype))
    assert_all_equal(weights(model), before_w, "predictive changed the weights")
    assert_nested_equal(before_sd, opt.state_dict())  # state and the training RNG untouched
    if "proxvi" in before_sd:
        assert_nested_equal(before_sd["proxvi"]["rng"], opt.state_dict()["proxvi"]["rng"])
    # a Bayesian model average over different samples is not one softmax of the current weights
    with torch.no_grad():
        assert not torch.equal(probs, torch.softmax(model(x).float(), -1))
    # dict inputs and outputs with .logits give the same average (same seed)
    probs_dict = opt.predictive(DictModel(model), {"features": x}, n_samples=8,
                                generator=torch.Generator().manual_seed(7))
    probs_logits = opt.predictive(LogitsModel(model), x, n_samples=8, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(probs_dict, probs)
    torch.testing.assert_close(probs_logits, probs)
    assert_all_equal(weights(model), before_w)


def test_predictive_does_not_change_training(make_opt, make_model, data, train):
    x, y = data
    runs = []
    for use_predictive in (False, True):
        model = make_model(seed=0)
        opt = make_opt(model.parameters())
        train(model, opt, x, y)
        if use_predictive:
            opt.predictive(model, x, n_samples=4)
            with opt.mean_params():
                model(x)
            with opt.sampled_params():
                model(x)
        for _ in range(2):
            train(model, opt, x, y)
        runs.append((weights(model), means(opt, model)))
    assert_all_equal(runs[0][0], runs[1][0])
    assert_all_equal(runs[0][1], runs[1][1])


def regression_model(offset: float = 0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_FEATURES, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, 1))
    with torch.no_grad():
        model[2].bias.add_(offset)
    return model


def regression_train(model, opt, x, target, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x).squeeze(-1), target).backward()
        opt.step()


def test_predictive_regression(make_opt, data):
    x, _ = data
    model = regression_model()
    opt = make_opt(model.parameters())
    regression_train(model, opt, x, x.sum(-1))
    before = weights(model)
    assert all((opt.posterior_std(p) > 0).all() for p in model.parameters())
    out = opt.predictive(model, x, n_samples=16, likelihood="regression")
    assert isinstance(out, tuple) and len(out) == 2
    mean, var = out
    assert mean.shape == (BATCH, 1) and var.shape == (BATCH, 1)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    assert (var >= 0).all()
    assert (var > 0).all(), "zero predictive variance although the posterior std is > 0"
    assert_all_equal(weights(model), before)


def test_predictive_regression_variance_matches_the_samples(make_opt, data):
    """The epistemic variance must agree with the spread of the sampled outputs, also when the
    outputs are far from 0 (unstandardised targets, e.g. prices around 50)."""
    x, _ = data
    model = regression_model(offset=50.0)
    opt = make_opt(model.parameters())
    regression_train(model, opt, x, 50.0 + x.sum(-1))
    n = 256
    outs = []
    with opt.sampled_params() as redraw, torch.no_grad():
        for j in range(n):
            if j:
                redraw()
            outs.append(model(x).double())
    ref_var = torch.stack(outs).var(0, unbiased=False)
    assert (ref_var > 0).all()
    _, var = opt.predictive(model, x, n_samples=n, likelihood="regression")
    ratio = var.double() / ref_var
    # two independent 256-sample estimates of the same variance agree to well within 2x
    ok = bool(((ratio > 0.5) & (ratio < 2.0)).all())
    assert ok, (
        f"predictive variance off by a factor {ratio.min().item():.3g}..{ratio.max().item():.3g}")


# ---------------------------------------------------------------------------- fresh samples
def test_each_step_leaves_a_fresh_sample_in_the_weights(make_opt, make_model, data, train):
    model = make_model()
    opt = make_opt(model.parameters(), lr=0.0)
    x, y = data
    train(model, opt, x, y)
    mean0 = means(opt, model)
    w1 = weights(model)
    for p, m in zip(model.parameters(), mean0, strict=True):
        assert not torch.equal(p, m.to(p.dtype)), "after step() the weights hold the mean"
    train(model, opt, x, y)
    w2 = weights(model)
    assert_all_equal(means(opt, model), mean0)  # lr=0: q did not move ...
    for a, b in zip(w1, w2, strict=True):
        assert not torch.equal(a, b), "... but a new sample must still be drawn"
    # the sample is distributed as q: standardised residuals look standard normal
    z = torch.cat([((p - opt.posterior_mean(p)) / opt.posterior_std(p)).flatten()
                   for p in model.parameters()]).double()
    assert abs(z.mean().item()) < 0.4 and 0.7 < z.std().item() < 1.3
