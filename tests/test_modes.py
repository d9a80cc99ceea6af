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
from conftest import OPTIMIZERS, train_step
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
def test_state_dict_in_eval_mode_is_silent_and_inside_a_context_warns(trained):
    """Eval mode: the state_dict holds the held training sample and the mode, so a checkpoint
    there resumes exactly (below). Inside a context the weights hold the block's values, which a
    model checkpoint taken there (in train mode) would resume from: that still warns."""
    model, opt = trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = opt.state_dict()  # train mode: silent, nothing held
        assert sd["proxvi"]["mode"] == "train" and not any("held_sample" in e for e in sd["state"].values())
        sample = weights(model)
        opt.eval()
        sd = opt.state_dict()  # eval mode: silent, the training sample of every parameter
    assert sd["proxvi"]["mode"] == "eval"
    assert_all_equal([sd["state"][i]["held_sample"] for i in range(len(sample))], sample)
    opt.train()
    with opt.mean_params(), pytest.warns(UserWarning, match=r"mean_params\(\).*after the `with` block"):
        opt.state_dict()


def _loop(model, opt, x, y, epochs, first=0, save_after=None, train_to_save=True):
    """A plain loop that evaluates in eval mode after each epoch and saves after epoch
    ``save_after``: in train mode (``train()`` before the save) or in eval mode."""
    ckpt = None
    for epoch in range(first, epochs):
        opt.train()
        for _ in range(2):
            train_step(model, opt, x, y)
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


def _load(make_model, make_opt, ckpt, model_first=True):
    model = make_model(seed=5)
    opt = make_opt(model.parameters())
    saved = torch.load(io.BytesIO(ckpt), weights_only=True)
    for load in ((model, opt) if model_first else (opt, model)):
        load.load_state_dict(saved["model" if load is model else "opt"])
    return model, opt, saved


@FAST
@pytest.mark.parametrize("train_to_save", [True, False], ids=["saved_in_train_mode", "saved_in_eval_mode"])
@pytest.mark.parametrize("model_first", [True, False], ids=["model_first", "optimizer_first"])
def test_eval_loop_checkpoint_resumes_bit_identically(make_opt, make_model, data, train_to_save, model_first):
    """Saved after evaluating, in eval mode as well as after train(): loaded into a fresh model and
    optimizer (either first), the next epoch's ``train()`` puts the training sample back and the
    run continues bit for bit."""
    x, y = data
    model = make_model()
    opt = make_opt(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = _loop(model, opt, x, y, 4, save_after=1, train_to_save=train_to_save)
    resumed, opt2, saved = _load(make_model, make_opt, ckpt, model_first)
    assert opt2._mode == ("train" if train_to_save else "eval")
    assert_all_equal(weights(resumed), list(saved["model"].values()))  # the model's: the mean in eval mode
    if not train_to_save:
        assert_all_equal(weights(resumed), means(opt2, resumed))
        resumed.zero_grad()
        F.cross_entropy(resumed(x), y).backward()
        with pytest.raises(RuntimeError, match=r"eval mode.*optimizer\.train\(\) first"):
            opt2.step()
    _loop(resumed, opt2, x, y, 4, first=2)
    assert_all_equal(weights(resumed), weights(model), "the resumed run diverged")
    assert_all_equal(means(opt2, resumed), means(opt, model))


def _bad_held(sd, what):
    entry = sd["state"][1]
    if what == "shape":
        entry["held_sample"] = entry["held_sample"].reshape(-1)[:-1]
    elif what == "dtype":
        entry["held_sample"] = entry["held_sample"].double()
    elif what == "not_a_tensor":
        entry["held_sample"] = entry["held_sample"].tolist()
    elif what == "missing":
        del entry["held_sample"]
    elif what == "in_train_mode":
        sd["proxvi"]["mode"] = "train"
    elif what == "mode":
        sd["proxvi"]["mode"] = "evaluation"


@pytest.mark.parametrize("what", ["shape", "dtype", "not_a_tensor", "missing", "in_train_mode", "mode"])
def test_a_corrupted_held_sample_is_refused_and_nothing_changes(make_model, data, train, what):
    x, y = data
    model = make_model()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64)
    train(model, opt, x, y)
    opt.eval()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0] = {k: v for k, v in sd["state"][0].items() if k != "proxvi"}  # one copy of the extras
    _bad_held(sd, what)
    model2 = make_model(seed=5)
    opt2 = ProxScoreOptimizer(model2.parameters(), lr=1e-2, dataset_size=64)
    train(model2, opt2, x, y)
    before = copy.deepcopy((weights(model2), opt2.state_dict(), opt2._mode, opt2._held))
    with pytest.raises(ValueError, match=r"held training sample|mode"):
        opt2.load_state_dict(sd)
    assert_nested_equal(copy.deepcopy((weights(model2), opt2.state_dict(), opt2._mode, opt2._held)), before)


def test_load_inside_a_context_is_refused(make_model, data, train):
    x, y = data
    model = make_model()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64)
    train(model, opt, x, y)
    sd = copy.deepcopy(opt.state_dict())
    with opt.mean_params(), pytest.raises(RuntimeError, match=r"load_state_dict\(\).*after the `with` block"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("prior_mean", ["zero", "init"])
def test_dcp_checkpoint_in_eval_mode_resumes_bit_identically(make_model, data, tmp_path, prior_mean):
    """torch.distributed.checkpoint loads only what its template names: the template of a
    checkpoint saved in eval mode comes from the fresh optimizer in eval mode (docs/api.md). A
    template in train mode loads the saved mode without the held samples: refused, naming that."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    x, y = data

    def make(seed):
        model = make_model(seed=seed)
        return model, ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64, prior_mean=prior_mean)

    def epoch(model, opt):
        opt.train()
        for _ in range(2):
            train_step(model, opt, x, y)
        opt.eval()

    model, opt = make(0)
    epoch(model, opt)
    mean = weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": a single-process checkpoint
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    for template_in_eval in (False, True):
        model2, opt2 = make(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_state_dict(model2, opt2)  # torch steps a fresh optimizer (zero grads, lr 0) here
            if template_in_eval:
                opt2.eval()
            model_sd, optim_sd = get_state_dict(model2, opt2)
            loaded = {"model": model_sd, "optim": optim_sd}
            dcp.load(loaded, checkpoint_id=str(tmp_path))
        if not template_in_eval:
            with pytest.raises(ValueError, match=r"saved in eval mode.*held training sample.*template"):
                set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
            continue
        set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert opt2._mode == "eval"
    assert_all_equal(weights(model2), mean, "the resumed model must hold the saved mean until train()")
    for run in ((model, opt), (model2, opt2)):
        for _ in range(2):
            epoch(*run)
        run[1].train()
    assert_all_equal(weights(model2), weights(model), "the resumed run diverged")
    assert_all_equal(means(opt2, model2), means(opt, model))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_copy_made_inside_a_context_ends_it_and_carries_the_evaluation_generator(make_model, data, train, mode):
    """deepcopy / pickle inside ``mean_params()`` / ``sampled_params()``: no block will end for the
    copy, so its weights show what its mode says (the training sample, or the mean), it can step
    (after train()), and its evaluation generator continues the original's stream."""
    x, y = data
    model = make_model()
    opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=64)
    train(model, opt, x, y)
    opt.predictive(model, x, n_samples=2)  # the evaluation generator has moved
    sample, mean = weights(model), means(opt, model)
    getattr(opt, mode)()
    for how in ("deepcopy", "pickle"):
        with opt.sampled_params():
            if how == "deepcopy":
                model_c, opt_c = copy.deepcopy((model, opt))
            else:
                buf = io.BytesIO()
                torch.save((model, opt), buf)
                model_c, opt_c = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
        assert opt_c._open == 0 and opt_c._mode == mode
        assert_all_equal(weights(model_c), sample if mode == "train" else mean)
        assert torch.equal(opt_c.predictive(model_c, x, n_samples=2), opt.predictive(model, x, n_samples=2))
        opt_c.train()
        assert_all_equal(weights(model_c), sample)
        train(model_c, opt_c, x, y)  # allowed: the copy is outside any block


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


def test_trainer_checkpoint_saved_right_after_an_evaluation_resumes_bit_identically(tmp_path):
    """The Trainer saves right after an evaluation (save_strategy equal to eval_strategy): without
    PosteriorMeanCallback the optimizer is still in eval mode (the mean in the weights), so its
    state_dict holds the training sample; resuming (the Trainer calls optimizer.train() before each
    step) ends where the uninterrupted run ends, with the callback or without, and nothing warns."""
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

    def run(out, callbacks, max_steps, resume=None):
        torch.manual_seed(0)
        model = Tiny()
        opt = ProxScoreOptimizer(model.parameters(), lr=1e-2, dataset_size=16)
        args = TrainingArguments(str(out), max_steps=max_steps, per_device_train_batch_size=8,
                                 eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                                 report_to=[], use_cpu=True, max_grad_norm=0.0, disable_tqdm=True,
                                 lr_scheduler_type="constant")
        trainer = Trainer(model, args, train_dataset=data, eval_dataset=data, optimizers=(opt, None),
                          callbacks=callbacks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train(resume_from_checkpoint=resume)
        assert not [w for w in caught if "state_dict()" in str(w.message)], [str(w.message) for w in caught]
        opt.train()
        return model, opt

    for name, callbacks in (("without", []), ("with", [PosteriorMeanCallback()])):
        model, opt = run(tmp_path / name / "whole", callbacks, 4)
        run(tmp_path / name / "killed", callbacks, 2)
        saved = torch.load(tmp_path / name / "killed" / "checkpoint-2" / "optimizer.pt", weights_only=True)
        assert saved["proxvi"]["mode"] == ("train" if callbacks else "eval")
        assert ("held_sample" in saved["state"][0]) == (not callbacks)
        resumed, opt2 = run(tmp_path / name / "killed", callbacks, 4,
                            resume=str(tmp_path / name / "killed" / "checkpoint-2"))
        assert_all_equal(weights(resumed), weights(model), f"{name} the callback: the resumed run diverged")
        assert_all_equal(means(opt2, resumed), means(opt, model))
