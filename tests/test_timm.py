"""timm: ``create_optimizer_v2(model, "proxvi", ...)`` builds a working ProxScoreOptimizer."""

from __future__ import annotations

import warnings

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is missing (the dev extra has it): pip install timm")
import torch_proxvi.integrations.timm  # noqa: E402,F401  (registers "proxvi")
from torch_proxvi import ProxScoreOptimizer  # noqa: E402
from torch_proxvi.reference.comparators import ivon_posterior_std  # noqa: E402


def small_model():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=3, pretrained=False)


def test_create_optimizer_v2_builds_proxscore_with_its_options():
    model = small_model()
    opt = timm.optim.create_optimizer_v2(model, "proxvi", lr=3e-3, dataset_size=123, prior_mean="init",
                                         betas=(0.8, 0.99))
    assert isinstance(opt, ProxScoreOptimizer)
    assert all(g["lr"] == 3e-3 and g["dataset_size"] == 123 and g["betas"] == (0.8, 0.99)
               for g in opt.param_groups)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters())
    # prior_mean="init" snapshots the pretrained weights at construction
    first = next(model.parameters())
    assert torch.equal(opt.state[first]["prior_mean"], first.detach())


def test_timm_optimizer_trains_and_weight_decay_warns_without_effect():
    model = small_model()
    with pytest.warns(UserWarning, match="prior_precision"):
        opt = timm.optim.create_optimizer_v2(model, "proxvi", lr=1e-3, weight_decay=0.05, dataset_size=64)
    # timm split the parameters into decay / no-decay groups; both train
    assert len(opt.param_groups) == 2
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timm.optim.create_optimizer_v2(model, "proxvi", lr=1e-3, dataset_size=64)   # wd 0: silent


def test_missing_dataset_size_still_names_it():
    with pytest.raises(TypeError, match="dataset_size"):
        timm.optim.create_optimizer_v2(small_model(), "proxvi", lr=1e-3)


def test_example_ivon_arm_trains_and_predicts_at_ivon_samples():
    """examples/timm_finetune.py --ivon: each step's forward and backward run at a fresh IVON sample
    (IVON counts the gradients it collected), and the predictive averages draws repeatably and
    leaves the mean in the model."""
    ivon = pytest.importorskip("ivon", reason="ivon-opt is missing (the dev extra has it): pip install ivon-opt")
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "timm_finetune.py"
    spec = importlib.util.spec_from_file_location("timm_finetune_example_test", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = small_model()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    args = argparse.Namespace(ivon_lr=0.1, ivon_hess_init=5.0, ivon_beta2=0.999)
    opt = example.make_ivon(model, args, len(y))
    # IVON's std at the start: (ess (hess_init + weight_decay))^(-1/2), weight_decay = 1 / ess
    std = ivon_posterior_std(opt)
    assert std.numel() == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(std, torch.full_like(std, (len(y) * (5.0 + 1 / len(y))) ** -0.5))
    seen = []
    real = ivon.IVON.step

    def step(self, *a, **kw):
        seen.append(self.state["count"])
        return real(self, *a, **kw)

    init = [p.detach().clone() for p in model.parameters()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ivon.IVON, "step", step)
        example.train(model, opt, x, y, example.batches(len(y), 4, 1, seed=0), desc="IVON")
    assert seen == [1, 1]   # one gradient collected at a sample before each of the two steps
    mean = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(init, mean))
    rng = torch.get_rng_state()
    probs = example.evaluate(model, x, opt=opt, n_samples=3, batch_size=4)
    assert torch.equal(torch.get_rng_state(), rng)   # the seeded draws leave torch's RNG as it was
    assert probs.shape == (8, 3) and torch.allclose(probs.sum(-1), torch.ones(8))
    assert torch.equal(probs, example.evaluate(model, x, opt=opt, n_samples=3, batch_size=4))
    assert not torch.allclose(probs, example.evaluate(model, x), atol=1e-4)   # samples, not the mean
    assert all(torch.equal(a, b) for a, b in zip(mean, model.parameters()))
