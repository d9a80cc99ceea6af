"""Shared pieces of the benchmark scripts: models, the training loop, evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_proxvi import ProxScoreOptimizer, metrics


def mlp(d_in: int, d_out: int, width: int = 256, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


def fit(model, opt, x, y, *, epochs: int, batch_size: int, seed: int, progress=None) -> None:
    """The unchanged Adam-style loop: zero_grad, mean cross-entropy, backward, step."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if progress is not None:
                progress.update(1)


@torch.no_grad()
def evaluate(model, opt, x, y, n_samples: int = 32) -> dict[str, float]:
    """Accuracy / NLL / ECE / Brier of the Bayesian predictive (or the point estimate)."""
    model.eval()
    if isinstance(opt, ProxScoreOptimizer):
        gen = torch.Generator().manual_seed(1234)
        probs = opt.predictive(model, x, n_samples=n_samples, generator=gen)
    else:
        probs = torch.softmax(model(x), dim=-1)
    return {
        "acc": float(metrics.accuracy(probs, y)),
        "nll": float(metrics.nll(probs, y)),
        "ece": float(metrics.ece(probs, y)),
        "brier": float(metrics.brier(probs, y)),
    }
