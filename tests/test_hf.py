"""Hugging Face Trainer integration on a tiny ViT (saved and reloaded with save/from_pretrained)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is missing (the dev extra has it): "
                                   "pip install transformers accelerate")

# the rest of transformers by attribute, when a test runs: importing Trainer and the ViT costs each
# pytest-xdist worker ~6 s at collection
from transformers import TrainerCallback  # noqa: E402

from torch_proxvi import ProxScoreOptimizer  # noqa: E402
from torch_proxvi.integrations.hf import PosteriorMeanCallback, bayesian_predict, unwrap_optimizer  # noqa: E402

N_TRAIN, N_EVAL, N_CLASSES, BATCH, STEPS = 64, 24, 3, 8, 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    num_labels=N_CLASSES)
    path = tmp_path_factory.mktemp("vit")
    transformers.ViTForImageClassification(config).save_pretrained(path)
    return path


def load(checkpoint):
    return transformers.ViTForImageClassification.from_pretrained(checkpoint)


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": int(y[i])} for i in range(n)]


def make_trainer(model, opt, tmp_path, *, scheduler=None, callbacks=(), **overrides):
    if scheduler is None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
    kw = dict(max_steps=STEPS, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
              save_strategy="no", report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
              max_grad_norm=0.0, dataloader_num_workers=0, seed=0)
    kw.update(overrides)
    return transformers.Trainer(model, transformers.TrainingArguments(str(tmp_path), **kw),
                                train_dataset=make_data(N_TRAIN, 1), eval_dataset=make_data(N_EVAL, 2),
                                optimizers=(opt, scheduler), callbacks=list(callbacks))


def make_opt(model, **kw):
    kw = {"lr": 1e-2, "dataset_size": N_TRAIN, "generator": torch.Generator().manual_seed(0), **kw}
    return ProxScoreOptimizer(model.parameters(), **kw)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def means(model, opt):
    return [opt.posterior_mean(p) for p in model.parameters()]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class RecordEvalWeights(TrainerCallback):
    """Copies the weights after each evaluation batch (the model still holds them then)."""

    def __init__(self):
        self.seen = []

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        self.seen.append((model.training, weights(model)))


def test_trainer_trains_and_moves_posterior(checkpoint, tmp_path):
    model = load(checkpoint)
    init = weights(model)
    opt = make_opt(model)
    trainer = make_trainer(model, opt, tmp_path)
    trainer.train()
    assert trainer.state.global_step == STEPS
    params = list(model.parameters())
    assert all(p in opt.state and opt.state[p] for p in params)
    moved = [not torch.allclose(m, w0) for m, w0 in zip(means(model, opt), init)]
    assert all(moved), sum(moved)
    stds = torch.cat([opt.posterior_std(p).flatten() for p in params])
    assert not torch.allclose(stds, torch.full_like(stds, 1e-3))
    # the weights hold a training sample: not the mean
    assert not same(weights(model), means(model, opt))
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


def test_scheduler_from_optimizers_tuple_is_stepped(checkpoint, tmp_path):
    model = load(checkpoint)
    opt = make_opt(model, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
    trainer = make_trainer(model, opt, tmp_path, scheduler=sched)
    trainer.train()
    assert sched.last_epoch == STEPS
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1.0 - STEPS / 10))
    logged = [log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log]
    assert logged[0] == pytest.approx(1e-3) and logged[-1] == pytest.approx(1e-3 * (1.0 - (STEPS - 1) / 10))


@pytest.mark.parametrize("run", ["evaluate", "predict"])
def test_evaluation_sees_mean_and_callback_restores_sample(checkpoint, tmp_path, run):
    model = load(checkpoint)
    opt = make_opt(model)
    recorder = RecordEvalWeights()
    trainer = make_trainer(model, opt, tmp_path, callbacks=[recorder, PosteriorMeanCallback()])
    trainer.train()
    sample = weights(model)
    mean = means(model, opt)
    assert not same(sample, mean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the callback warns if the Trainer did not call eval()
        if run == "evaluate":
            trainer.evaluate()
        else:
            trainer.predict(make_data(N_EVAL, 3))
    assert len(recorder.seen) == N_EVAL // BATCH
    for training, seen in recorder.seen:
        assert not training and same(seen, mean)
    assert same(weights(model), sample)  # the training sample is back
    assert unwrap_optimizer(trainer.optimizer)._mode == "train"


def test_trainer_alone_leaves_mean_in_weights_after_evaluate(checkpoint, tmp_path):
    """What the callback is for: the installed Trainer calls optimizer.eval() but not train() after."""
    model = load(checkpoint)
    opt = make_opt(model)
    trainer = make_trainer(model, opt, tmp_path)
    trainer.train()
    sample = weights(model)
    trainer.evaluate()
    assert same(weights(model), means(model, opt))
    PosteriorMeanCallback(opt).on_evaluate(None, None, None)
    assert same(weights(model), sample)


def test_evaluation_during_training_does_not_change_training(checkpoint, tmp_path):
    finals = []
    for evaluate in (False, True):
        model = load(checkpoint)
        opt = make_opt(model)
        extra = dict(eval_strategy="steps", eval_steps=1) if evaluate else {}
        trainer = make_trainer(model, opt, tmp_path, callbacks=[PosteriorMeanCallback()], **extra)
        trainer.train()
        assert any("eval_loss" in log for log in trainer.state.log_history) == evaluate
        finals.append((weights(model), means(model, opt)))
    assert same(finals[0][0], finals[1][0]) and same(finals[0][1], finals[1][1])


def test_callback_warns_when_trainer_did_not_call_eval(checkpoint):
    model = load(checkpoint)
    opt = make_opt(model)
    with pytest.warns(RuntimeWarning, match="optimizer.eval"):
        PosteriorMeanCallback(opt).on_evaluate(None, None, None)


def test_bayesian_predict(checkpoint, tmp_path):
    model = load(checkpoint)
    opt = make_opt(model, init_std=0.05, scale_lr_ratio=0.0)
    trainer = make_trainer(model, opt, tmp_path)
    trainer.train()
    data = make_data(N_EVAL + 3, 4)  # a last partial batch
    model.train()
    sample = weights(model)
    forward_modes = []
    model.register_forward_pre_hook(lambda module, args: forward_modes.append(module.training))

    probs, labels = bayesian_predict(trainer.optimizer, model, data, n_samples=8, batch_size=BATCH, seed=0)
    assert probs.shape == (len(data), N_CLASSES) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(data)))
    assert torch.equal(labels, torch.tensor([d["labels"] for d in data]))
    assert same(weights(model), sample) and model.training  # weights and train mode restored
    assert forward_modes and not any(forward_modes)  # predicted in eval mode
    assert len(forward_modes) == 8 * 4  # n_samples forwards for each of the 4 batches

    # a Monte Carlo average: not the prediction of the mean weights, and not of a single sample
    x = torch.stack([d["pixel_values"] for d in data])
    with opt.mean_params(), torch.no_grad():
        mean_probs = torch.softmax(model.eval()(pixel_values=x).logits, -1)
    assert (probs - mean_probs).abs().max() > 1e-3
    one, _ = bayesian_predict(opt, model, data, n_samples=1, batch_size=BATCH, seed=0)
    assert (probs - one).abs().max() > 1e-3
    # with a seed every batch uses the same samples: equal to one full batch with that generator
    full = opt.predictive(model, {"pixel_values": x}, n_samples=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(probs, full, atol=1e-5, rtol=1e-5)
    again, _ = bayesian_predict(opt, model, data, n_samples=8, batch_size=5, seed=0)
    torch.testing.assert_close(again, probs, atol=1e-5, rtol=1e-5)

    # in eval mode (mean in the weights) it still samples and leaves the mean in place
    opt.eval()
    in_eval, _ = bayesian_predict(opt, model, data, n_samples=8, batch_size=BATCH, seed=0)
    assert same(weights(model), means(model, opt))
    torch.testing.assert_close(in_eval, probs)
    opt.train()
    assert same(weights(model), sample)


def test_bayesian_predict_without_labels_and_errors(checkpoint):
    model = load(checkpoint)
    opt = make_opt(model)
    data = [{"pixel_values": d["pixel_values"]} for d in make_data(10, 5)]
    probs, labels = bayesian_predict(opt, model, data, n_samples=2, batch_size=4)
    assert probs.shape == (10, N_CLASSES) and labels is None
    with pytest.raises(TypeError, match="torch_proxvi optimizer"):
        bayesian_predict(torch.optim.SGD(model.parameters(), lr=0.1), model, data)
    with pytest.raises(TypeError, match="dicts"):
        bayesian_predict(opt, model, [d["pixel_values"] for d in data])


class StopAt(TrainerCallback):
    """Ends training after ``step`` (after its checkpoint is written): a job killed mid-run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save, control.should_training_stop = True, True
        return control


class TinyClassifier(torch.nn.Module):
    """A plain module with the Trainer's calling convention (``loss`` from ``labels``).

    Resumed as it is, unlike the ViT: with transformers 5.x, ``Trainer`` writes a ViT checkpoint
    under the legacy key names (``vit.encoder.layer.*``) but loads it without renaming
    (``vit.layers.*``), so resuming a ViT restores no encoder weight whatever the optimizer unless
    the weights are reloaded by ``from_pretrained`` first (docs/integrations.md).
    """

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, N_CLASSES))

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("kind", ["module", "vit"])
def test_trainer_checkpoint_resume_continues_bit_identically(checkpoint, tmp_path, kind):
    """Trainer saves model, optimizer, scheduler and RNG state; resuming from the checkpoint in a new
    Trainer (new model, new optimizer) ends exactly where the uninterrupted run ends. The ViT is
    resumed with the documented workaround: its weights reloaded by ``from_pretrained``."""
    steps, stop = 8, 3
    saved = tmp_path / "killed" / f"checkpoint-{stop}"

    def run(out, *, resume=False, stop_at=None):
        torch.manual_seed(0)
        if kind == "module":
            model = TinyClassifier()
        else:
            model = transformers.ViTForImageClassification.from_pretrained(saved if resume else checkpoint)
        opt = make_opt(model)
        callbacks = [PosteriorMeanCallback()] + ([StopAt(stop_at)] if stop_at else [])
        trainer = make_trainer(model, opt, out, max_steps=steps, save_strategy="steps", save_steps=stop,
                               callbacks=callbacks)
        trainer.train(resume_from_checkpoint=str(saved) if resume else None)
        return trainer, model, opt

    _, model, opt = run(tmp_path / "whole")
    _, killed, killed_opt = run(tmp_path / "killed", stop_at=stop)
    assert all(s["step"] == stop for s in killed_opt.state.values())
    assert not same(weights(killed), weights(model))
    resumed_trainer, resumed, resumed_opt = run(tmp_path / "killed", resume=True)
    assert resumed_trainer.state.global_step == steps
    assert same(weights(resumed), weights(model))  # the training sample of the last step
    assert same(means(resumed, resumed_opt), means(model, opt))
    assert same([resumed_opt.posterior_std(p) for p in resumed.parameters()],
                [opt.posterior_std(p) for p in model.parameters()])
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


class _Images(torch.utils.data.Dataset):
    """The interface of the HF example's ``Images`` (``x``, ``y``, Trainer-style items) on the tiny ViT."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_example_ivon_arm_trains_ivon_at_its_samples(checkpoint, tmp_path):
    """examples/hf_vit_finetune.py --arms ivon: every Trainer step runs its forward and backward at a
    fresh IVON sample (IVON counts the gradients it collected), and the table scores the mean."""
    ivon = pytest.importorskip("ivon", reason="ivon-opt is missing (the dev extra has it): pip install ivon-opt")
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "hf_vit_finetune.py"
    spec = importlib.util.spec_from_file_location("hf_vit_finetune_example_test", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = load(checkpoint)
    init = weights(model)
    seen = []
    real = ivon.IVON.step

    def step(opt, *args, **kwargs):   # what the optimizer steps from, and the weights it leaves
        seen.append(opt.state["count"])
        return real(opt, *args, **kwargs)

    a = argparse.Namespace(out=tmp_path, epochs=1.0, batch_size=BATCH, warmup=1, seed=0, ivon_lr=0.1,
                           ivon_hess_init=5.0, ivon_beta2=0.999, prior_precision=1.0, n_samples=3)
    ft, test = _Images(N_TRAIN, 1), _Images(N_EVAL, 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ivon.IVON, "step", step)
        rows = example.finetune_ivon(model, ft, test, a)
    assert seen == [1] * (N_TRAIN // BATCH)   # one gradient collected at a sample before each step
    assert [r.split(" | ")[0] for r in rows] == ["| IVON posterior mean (softmax)",
                                                 "| IVON Bayesian predictive (3 samples)"]
    assert all(math.isfinite(float(v)) for r in rows for v in r.strip("| ").split(" | ")[1:])
    assert not same(weights(model), init)   # trained, and back at the mean after the predictive
