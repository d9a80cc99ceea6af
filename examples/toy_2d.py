"""Fit every method to two 2-D non-Gaussian targets and draw q over the true density.

    python examples/toy_2d.py                    # writes docs/img/toy_2d.png

Targets: a banana (x2 bends with x1^2) and a two-component Gaussian mixture. Each method sees
the target as an ordinary loss on a 2-vector parameter (``loss = -log p(theta)``,
``dataset_size=1``, a negligible prior) through its torch.optim interface; the fitted Gaussian
is drawn as its 1- and 2-sigma ellipses over the target's contours. Gaussian families cannot
bend or split, so this shows *which* Gaussian each method settles on: the mode-seeking
reverse-KL fit (ProxScore, ADVI), or the score-matching fits of GSM and BaM, which try to match
the score at the samples and land elsewhere on non-Gaussian targets.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from torch_proxvi import ADVI, GSM, BaM, ProxScoreOptimizer


def banana(theta: torch.Tensor) -> torch.Tensor:
    x1, x2 = theta[..., 0], theta[..., 1]
    return -0.5 * (x1 / 1.5) ** 2 - 0.5 * ((x2 - 0.4 * x1**2 + 1.0) / 0.5) ** 2


def mixture(theta: torch.Tensor) -> torch.Tensor:
    a = -0.5 * (((theta - torch.tensor([-1.8, -0.5])) / torch.tensor([0.6, 0.6])) ** 2).sum(-1)
    b = -0.5 * (((theta - torch.tensor([1.8, 0.8])) / torch.tensor([0.8, 0.5])) ** 2).sum(-1)
    return torch.logaddexp(a - math.log(0.36), b - math.log(0.4))


METHODS = {
    "ProxScore": lambda ps: ProxScoreOptimizer(ps, 0.05, dataset_size=1, prior_precision=1e-6,
                                               init_std=1.0, mc_samples=4),
    "ADVI": lambda ps: ADVI(ps, 0.05, dataset_size=1, prior_precision=1e-6, init_std=1.0, mc_samples=4),
    "GSM (dense)": lambda ps: GSM(ps, 0.3, dataset_size=1, prior_precision=1e-6, init_std=1.0,
                                 mc_samples=4, covariance="dense"),
    "BaM (dense)": lambda ps: BaM(ps, 1.0, dataset_size=1, prior_precision=1e-6, init_std=1.0,
                                 mc_samples=4, covariance="dense"),
}


def fit(method: str, log_p, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of the Gaussian the method fits to ``exp(log_p)``."""
    torch.manual_seed(seed)
    theta = torch.nn.Parameter(torch.tensor([0.3, 0.2]))
    opt = METHODS[method]([theta])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + 10 * t / steps))

    def closure():
        opt.zero_grad()
        loss = -log_p(theta)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        sched.step()
    mean = opt.posterior_mean(theta)
    if "covariance" in opt.state[theta]:
        return mean, opt.state[theta]["covariance"]
    return mean, torch.diag(opt.posterior_std(theta) ** 2)


def ellipse(mean, cov, radius):
    angle = torch.linspace(0, 2 * math.pi, 200, dtype=mean.dtype)
    circle = torch.stack([angle.cos(), angle.sin()], 1) * radius
    values, vectors = torch.linalg.eigh(cov)
    return mean + circle @ (vectors * values.clamp_min(0).sqrt()).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="docs/img/toy_2d.png")
    args = ap.parse_args()
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("toy_2d.py draws its figure with matplotlib: pip install matplotlib") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = {"banana": banana, "two-component mixture": mixture}
    fig, axes = plt.subplots(len(targets), len(METHODS), figsize=(3.2 * len(METHODS), 3.0 * len(targets)))
    xs, ys = torch.meshgrid(torch.linspace(-4.5, 4.5, 200), torch.linspace(-3.5, 4.5, 200), indexing="xy")
    grid = torch.stack([xs, ys], -1)
    for i, (tname, log_p) in enumerate(targets.items()):
        density = log_p(grid).exp()
        for j, method in enumerate(METHODS):
            mean, cov = fit(method, log_p, args.steps)
            print(f"{tname:22s} {method:12s} mean {[round(v, 2) for v in mean.tolist()]} "
                  f"sd {[round(v, 2) for v in cov.diagonal().sqrt().tolist()]}")
            ax = axes[i][j]
            ax.contour(xs, ys, density, levels=6, colors="grey", linewidths=0.7)
            for radius, style in ((1, "-"), (2, "--")):
                e = ellipse(mean.double(), cov.double(), radius)
                ax.plot(e[:, 0], e[:, 1], style, color="C3", lw=1.4)
            ax.plot(*mean.tolist(), "o", color="C3", ms=3)
            ax.set_title(f"{method}: {tname}", fontsize=9)
            ax.set_xlim(-4.5, 4.5)
            ax.set_ylim(-3.5, 4.5)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
