"""Reference posteriors with closed-form answers, for checking inference (tests, benchmarks).

``PeakTemporaries`` measures the peak bytes of tensors allocated inside a block (CPU too).

``linear_regression`` builds a Bayesian linear regression whose exact posterior is Gaussian;
its optimal mean-field approximation has the exact posterior mean and, as precisions, the
diagonal of the exact precision matrix. ``mean_field_kl`` measures how far a fitted
mean-field Gaussian is from it.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LinearRegression", "linear_regression", "mean_field_kl", "fit_linear_regression",
           "PeakTemporaries", "tensors_in"]


class LinearRegression(NamedTuple):
    x: Tensor                 # [n, d] inputs
    y: Tensor                 # [n, 1] targets
    noise_std: float          # known observation noise
    prior_precision: float
    mean: Tensor              # [d + 1] exact posterior mean of (weight..., bias)
    precision_diag: Tensor    # [d + 1] diagonal of the exact posterior precision

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """The mean Gaussian NLL of a batch (up to a constant): MSE / (2 noise^2)."""
        return 0.5 * ((prediction - target) ** 2).mean() / self.noise_std**2


def linear_regression(n: int = 200, d: int = 5, noise_std: float = 0.5,
                      prior_precision: float = 1.0, seed: int = 0) -> LinearRegression:
    """y = x w + 0.3 + noise, float64; prior N(0, 1/prior_precision) on weights and bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, 1, generator=g, dtype=torch.float64)
    y = x @ w + 0.3 + noise_std * torch.randn(n, 1, generator=g, dtype=torch.float64)
    design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    precision = design.T @ design / noise_std**2 + prior_precision * torch.eye(d + 1, dtype=torch.float64)
    mean = torch.linalg.solve(precision, design.T @ y / noise_std**2).squeeze(1)
    return LinearRegression(x, y, noise_std, prior_precision, mean, torch.diag(precision))


def mean_field_kl(mean: Tensor, std: Tensor, target_mean: Tensor, target_precision: Tensor) -> float:
    """KL(N(mean, std^2) || N(target_mean, 1/target_precision)), summed over coordinates."""
    var, target_var = std.double() ** 2, 1 / target_precision
    return float(0.5 * (var / target_var + (mean.double() - target_mean) ** 2 / target_var - 1
                        + torch.log(target_var / var)).sum())


def fit_linear_regression(make_optimizer, problem: LinearRegression, *, batch_size: int, steps: int,
                          decay: float, seed: int = 0, use_closure: bool = False):
    """Fit ``nn.Linear`` to ``problem`` with an ordinary loop and an lr decaying as 1/(1 + t/decay).

    ``make_optimizer(params, dataset_size)`` builds the optimizer. Returns ``(model, optimizer,
    kl)`` where ``kl`` is :func:`mean_field_kl` of the fitted posterior to the optimal mean field.
    """
    n = len(problem.x)
    torch.manual_seed(seed)
    model = torch.nn.Linear(problem.x.shape[1], 1).double()
    opt = make_optimizer(model.parameters(), n)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t / decay))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(n, generator=g)[:batch_size]

        def closure(idx=idx):
            opt.zero_grad()
            loss = problem.loss(model(problem.x[idx]), problem.y[idx])
            loss.backward()
            return loss

        if use_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
        sched.step()
    params = [model.weight, model.bias]
    mean = torch.cat([opt.posterior_mean(p).flatten() for p in params])
    std = torch.cat([opt.posterior_std(p).flatten() for p in params])
    return model, opt, mean_field_kl(mean, std, problem.mean, problem.precision_diag)


class PeakTemporaries(TorchDispatchMode):
    """Track the bytes of tensors that ops allocate, and their peak while alive."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen: set[int] = set()

    def _free(self, nbytes: int, ptr: int) -> None:
        self.live -= nbytes
        self.seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {a.untyped_storage().data_ptr() for a in tensors_in(args) + tensors_in(kwargs or {})}
        out = func(*args, **(kwargs or {}))
        for t in tensors_in(out):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self.seen or storage.nbytes() == 0:
                continue
            self.seen.add(ptr)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, storage.nbytes(), ptr)
        return out


def tensors_in(obj) -> list[torch.Tensor]:
    """Every tensor in a nest of lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in tensors_in(o)]
    return []
