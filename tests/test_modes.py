"""Modes compose and nothing is silent (issue 18, items 7 and 8).

The weights hold the training sample, or a value swapped in over it: the posterior mean in eval
mode, or a context's values (``mean_params()``, ``sampled_params()``). Contexts nest, ``eval()`` /
``train()`` may be called anywhere, and whatever the order the training sample comes back when
the last context ends in train mode. A step is refused wherever its fresh sample could be lost.
The rest: warnings and errors where a user's mistake used to be silent.
"""

from __future__ import annotations

import copy
import io
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import OPTIMIZERS
from helpers import assert_all_equal, assert_nested_equal, weights
from torch import nn

from torch_proxvi import ProxScoreOptimizer

ROOT = Path(__file__).resolve().parents[1]


def means(opt, model):
    return [opt.posterior_mean(p).to(p.dtype) for p in model.parameters()]


def same(xs, ys) -> bool:
    return all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))


# The dense flow's mean is a 2048-draw Monte Carlo estimate (seconds per call here): the mode
# logic reaches a family only through its mean and sampler, so the tests of modes run over the
# other optimizers of the table, and the RNG test, which checks every sampler, over all.
FAST = pytest.mark.parametrize("make_opt", [n for n in OPTIMIZERS if n != "proxscore_flow"], indirect=True)


# ---------------------------------------------------------------------------- 7: modes compose
@FAST
def test_eval_inside_a_context_then_train_keeps_the_training_sample(trained):
    model, opt = trained
    sample, mean = weights(model), means(opt, model)
    assert not same(sample, mean)

    with opt.mean_params():          # eval() and train() inside, then leave: train mode
        opt.eval()
        opt.train()
    assert_all_equal(weights(model), sample, "the training sample was lost")

    with opt.mean_params():          # eval() inside, leave in eval mode, train() after
        opt.eval()
    assert_all_equal(weights(model), mean, "eval mode after the block must show the mean")
    opt.train()
    assert_all_equal(weights(model), sample, "train() after the block lost the training sample")

    opt.eval()                       # train() inside a context opened in eval mode
    with opt.sampled_params():
        opt.train()
    assert_all_equal(weights(model), sample, "train mode after the block must show the sample")

    opt.eval()                       # a context in eval mode gives the mean back on exit
    with opt.sampled_params():
        pass
    assert_all_equal(weights(model), mean)
    opt.train()
    assert_all_equal(weights(model), sample)


class Boom(Exception):
    pass


@FAST
def test_modes_and_nested_contexts_follow_one_state_machine(trained):
    """Random sequences of eval/train/enter/exit/redraw: outside any context the weights hold
    what the mode says (sample or mean); inside, what the innermost context wrote. An exception
    unwinding the open contexts ends the same way."""
    model, opt = trained
    sample, mean = weights(model), means(opt, model)
    rng = random.Random(0)
    for run in range(4):
        mode, open_ = "train", []      # the reference: the mode and each open context's values
        for _ in range(30):
            op = rng.choice(["eval", "train", "mean", "sampled", "exit", "exit", "redraw"])
            if op in ("eval", "train"):
                getattr(opt, op)()
                mode = op
            elif op in ("mean", "sampled"):
                cm = opt.mean_params() if op == "mean" else opt.sampled_params()
                redraw = cm.__enter__()
                open_.append([cm, redraw, mean if op == "mean" else weights(model)])
                if op == "sampled":
                    assert not same(open_[-1][2], sample) and not same(open_[-1][2], mean)
            elif op == "exit" and open_:
                open_.pop()[0].__exit__(None, None, None)
            elif op == "redraw" and open_ and open_[-1][1] is not None:
                before = weights(model)
                open_[-1][1]()
                open_[-1][2] = weights(model)
                assert not same(before, open_[-1][2])
            expected = open_[-1][2] if open_ else (mean if mode == "eval" else sample)
            assert_all_equal(weights(model), expected, f"after {op}: {mode} mode, {len(open_)} open")
        while open_:  # the rest end by an exception (odd runs) or normally
            error = (Boom, Boom(), None) if run % 2 else (None, None, None)
            open_.pop()[0].__exit__(*error)
        assert_all_equal(weights(model), mean if mode == "eval" else sample)
        opt.train()
        assert_all_equal(weights(model), sample)


@FAST
@pytest.mark.parametrize("context", ["mean_params", "sampled_params"])
@pytest.mark.parametrize("with_closure", [False, True])
def test_step_inside_a_context_is_refused_before_anything_changes(trained, data, context, with_closure):
    model, opt = trained
    x, y = data
    sample = weights(model)
    before = copy.deepcopy(opt.state_dict())
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with getattr(opt, context)():
        inside = weights(model)
        closure()  # gradients at the swapped-in values, as a user's loop would make them
        calls.clear()
        with pytest.raises(RuntimeError, match=rf"{context}\(\).*after the `with` block"):
            opt.step(closure if with_closure else None)
        assert not calls, "the closure ran although the step is refused"
        assert_all_equal(weights(model), inside)
    assert_all_equal(weights(model), sample)
    assert_nested_equal(before, opt.state_dict())
    opt.step(closure if with_closure else None)  # allowed after the block
    assert not same(weights(model), sample)


@FAST
def test_state_dict_while_the_weights_do_not_hold_the_training_sample_warns(trained):
    model, opt = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.state_dict()  # train mode: silent
    opt.eval()
    with pytest.warns(UserWarning, match=r"eval mode.*optimizer\.train\(\) before saving"):
        opt.state_dict()
    opt.train()
    with opt.mean_params(), pytest.warns(UserWarning, match=r"mean_params\(\)"):
        opt.state_dict()


def _loop(model, opt, x, y, epochs, first=0, save_after=None, train_to_save=True):
    """A plain loop that evaluates in eval mode after each epoch and saves after epoch
    ``save_after``: as the warning says (``train()`` before the save) or not."""
    ckpt = None
    for epoch in range(first, epochs):
        opt.train()
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        opt.eval()
        with torch.no_grad():
            model(x)
        if epoch == save_after:
            if train_to_save:
                opt.train()
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            ckpt = buf.getvalue()
            opt.eval()
    opt.train()
    return ckpt


def _resume(make_model, ckpt, x, y):
    model = make_model(seed=5)
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64)
    saved = torch.load(io.BytesIO(ckpt), weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    _loop(model, opt, x, y, 4, first=2)
    return model, opt


def test_eval_loop_checkpoint_saved_as_the_warning_says_resumes_bit_identically(make_model, data):
    x, y = data
    model = make_model()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = _loop(model, opt, x, y, 4, save_after=1)
    resumed, opt2 = _resume(make_model, ckpt, x, y)
    assert_all_equal(weights(resumed), weights(model))
    assert_all_equal(means(opt2, resumed), means(opt, model))

    # what the warning is for: saved in eval mode, the checkpoint holds the mean and resumes elsewhere
    model = make_model()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64)
    with pytest.warns(UserWarning, match="eval mode"):
        ckpt = _loop(model, opt, x, y, 4, save_after=1, train_to_save=False)
    resumed, opt2 = _resume(make_model, ckpt, x, y)
    assert not same(weights(resumed), weights(model))


# ---------------------------------------------------------------------------- 8: nothing silent
def test_mc_samples_without_a_closure_warns_once(make_model, data, train):
    x, y = data
    model = make_model()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64, mc_samples=4)
    with pytest.warns(UserWarning, match=r"mc_samples=4.*closure") as record:
        for _ in range(3):
            train(model, opt, x, y)
    assert sum("mc_samples" in str(w.message) for w in record) == 1

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64, mc_samples=4)
        opt.step(closure)  # with a closure: K samples, nothing to warn about
        opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64)
        train(model, opt, x, y)  # mc_samples=1 without a closure: nothing to warn about


@pytest.mark.parametrize(("key", "nearest"), [("lrr", "lr"), ("dataset_sizee", "dataset_size"),
                                              ("prior_precison", "prior_precision"), ("beta", "betas"),
                                              ("mc_sample", "mc_samples")])
def test_misspelled_group_key_is_refused_naming_the_nearest(make_model, key, nearest):
    model = make_model()
    with pytest.raises(ValueError, match=rf"{key!r}.*did you mean {nearest!r}"):
        ProxScoreOptimizer([{"params": model.parameters(), key: 0.1}], lr=1e-2, dataset_size=64)
    opt = ProxScoreOptimizer(model[0].parameters(), lr=1e-2, dataset_size=64)
    groups = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match=rf"{key!r}.*did you mean {nearest!r}"):
        opt.add_param_group({"params": model[2].parameters(), key: 0.1})
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in groups]


def test_group_metadata_and_optimizer_only_keys(make_model):
    model = make_model()
    # keys other code puts into groups (a name, timm's weight_decay and lr_scale) are the caller's
    ProxScoreOptimizer([{"params": model.parameters(), "name": "body", "weight_decay": 0.0,
                         "lr_scale": 0.5, "initial_lr": 1e-2}], lr=1e-2, dataset_size=64)
    with pytest.raises(ValueError, match=r"'generator'.*ProxScoreOptimizer\(\.\.\., generator="):
        ProxScoreOptimizer([{"params": model.parameters(), "generator": torch.Generator()}],
                           lr=1e-2, dataset_size=64)


def test_evaluation_leaves_torch_global_rng_unchanged(trained, data):
    model, opt = trained
    x, _ = data
    before = torch.get_rng_state()
    first = opt.predictive(model, x, n_samples=4)
    second = opt.predictive(model, x, n_samples=4)
    opt.predictive(model, x, n_samples=2, likelihood="regression")
    with opt.sampled_params() as redraw:
        redraw()
    with opt.mean_params():
        pass
    opt.eval()
    opt.train()
    assert torch.equal(torch.get_rng_state(), before), "evaluation changed torch's global RNG"
    assert not torch.equal(first, second), "successive predictive calls must draw new samples"
    # an explicit generator still makes it repeatable
    a = opt.predictive(model, x, n_samples=4, generator=torch.Generator().manual_seed(3))
    b = opt.predictive(model, x, n_samples=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_predictive_does_not_change_the_next_epochs_shuffling(make_model, data, train):
    """The user's story: evaluate, then the next epoch's DataLoader order must not change."""
    x, y = data
    orders = []
    for evaluate in (False, True):
        torch.manual_seed(0)
        model = make_model()
        opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64)
        train(model, opt, x, y)
        if evaluate:
            opt.predictive(model, x, n_samples=4)
        loader = torch.utils.data.DataLoader(torch.arange(16), batch_size=16, shuffle=True)
        orders.append(next(iter(loader)))
    assert torch.equal(orders[0], orders[1])


def test_batchnorm_statistics_move_once_per_closure_call_as_documented(data):
    """Documented, not changed: with K = mc_samples the closure runs K forwards in train mode, so
    BatchNorm's running statistics are updated K times per step (docs/api.md)."""
    x, y = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64, mc_samples=3)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert int(model[1].num_batches_tracked) == 3
    api = (ROOT / "docs" / "api.md").read_text()
    assert re.search(r"BatchNorm.*running statistics.*K times", api, re.S)


def test_readme_after_training_section_saves_the_mean(make_model, data, train, tmp_path):
    """The README says the weights hold a sample after training and shows how to save the mean;
    its code does what it says."""
    readme = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", readme, re.M)
    assert "After training: the weights hold a sample" in headings
    # the README's order: the two-line change, the results, then the rest
    assert headings.index("The two-line change") < headings.index("Results") \
        < headings.index("After training: the weights hold a sample")
    section = readme.split("## After training: the weights hold a sample")[1].split("\n## ")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    x, y = data
    model = make_model()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64)
    for _ in range(2):
        train(model, opt, x, y)
    sample = weights(model)
    path = tmp_path / "posterior_mean.pt"
    exec(code.replace('"posterior_mean.pt"', repr(str(path))), {"torch": torch, "opt": opt, "model": model})
    saved = torch.load(path, weights_only=True)
    assert_all_equal(list(saved.values()), means(opt, model))
    assert_all_equal(weights(model), sample)


def test_hf_callback_warns_that_max_grad_norm_clips_the_score(tmp_path):
    pytest.importorskip("transformers", reason="transformers is missing (the dev extra has it)")
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from torch_proxvi.integrations.hf import PosteriorMeanCallback

    opt = ProxScoreOptimizer(nn.Linear(2, 2).parameters(), lr=1e-2, dataset_size=64)
    callback = PosteriorMeanCallback(opt)
    for norm in (1.0, 0.5):  # 1.0 is the Trainer's default
        args = TrainingArguments(str(tmp_path), max_grad_norm=norm, report_to=[], use_cpu=True)
        with pytest.warns(UserWarning, match=r"max_grad_norm=.*max_grad_norm=0\.0"):
            callback.on_train_begin(args, TrainerState(), TrainerControl(), optimizer=opt)
    for norm in (0.0, None):
        args = TrainingArguments(str(tmp_path), max_grad_norm=norm, report_to=[], use_cpu=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            callback.on_train_begin(args, TrainerState(), TrainerControl(), optimizer=opt)


def test_trainer_saving_after_evaluation_warns_without_the_callback_and_not_with_it(tmp_path):
    """The Trainer saves right after an evaluation (save_strategy equal to eval_strategy), when
    the weights still hold the mean unless PosteriorMeanCallback put the training sample back."""
    pytest.importorskip("transformers", reason="transformers is missing (the dev extra has it)")
    from transformers import Trainer, TrainingArguments

    from torch_proxvi.integrations.hf import PosteriorMeanCallback

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 3)

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, generator=g), "labels": i % 3} for i in range(16)]
    for callbacks in ([], [PosteriorMeanCallback()]):
        model = Tiny()
        opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=16)
        args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=8, eval_strategy="steps",
                                 eval_steps=2, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                                 max_grad_norm=0.0, disable_tqdm=True)
        trainer = Trainer(model, args, train_dataset=data, eval_dataset=data, optimizers=(opt, None),
                          callbacks=callbacks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        warned = [w for w in caught if "state_dict() called in eval mode" in str(w.message)]
        assert bool(warned) == (not callbacks), [str(w.message) for w in caught]
