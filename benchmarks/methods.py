"""The four methods of the evidence benchmarks behind one interface, and validation-split tuning.

Every method trains with the same loop (same batches, same loss, same number of steps) and is
evaluated through :func:`draws`: ``S`` outputs of the model at ``S`` posterior samples (one output,
the point estimate, for Adam).

* ``Adam``: the MAP estimate. ``weight_decay = prior_precision / N`` is the gradient of the same
  Gaussian prior the Bayesian methods use, per example (torch's Adam adds it to the gradient).
* ``ADVI``: :class:`torch_proxvi.ADVI`, the reparameterised ELBO with the same prior.
* ``IVON``: ``ivon.IVON`` (``pip install ivon-opt``), with ``ess = N`` and
  ``weight_decay = prior_precision / N`` (its prior precision is ``ess * weight_decay``). Its loop is
  its own: the backward runs inside ``opt.sampled_params(train=True)``.
* ``ProxScore``: :class:`torch_proxvi.ProxScoreOptimizer` with its defaults.
* ``ProxScore-flow`` (on request): the same with ``family="elementwise_flow"``.
* ``ProxScore-solved`` (on request): the same with ``rule="solved"``.

:func:`tune` runs every configuration of a method's grid once (seed 0), scores it on the
validation split, keeps the best, and runs the remaining seeds with it. Every method gets a grid of
the same size, so the tuning budget is the same.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from torch_proxvi import ADVI, ProxScoreOptimizer
from torch_proxvi.reference.comparators import is_ivon, ivon_draws, ivon_posterior_std, training_sample

NAMES = ("Adam", "ADVI", "IVON", "ProxScore")
# Not run by default: ProxScore with the element-wise sinh-arcsinh flow family (skew and tail
# weight per weight; docs/api.md "Variational families"), at about 10x the Gaussian's step cost.
# ProxScore-solved: ``rule="solved"`` (issue 19), the precision solved per weight from the
# data-driven start P0 = N * init_curvature + prior precision; it tunes lr and init_curvature.
EXTRA = ("ProxScore-flow", "ProxScore-solved")
CHOICES = NAMES + EXTRA
PRIOR_PRECISION = 1.0

# Four configurations each (the same tuning budget). Adam tunes its learning rate; each VI method
# tunes two learning rates and two initial posterior spreads: ADVI's and ProxScore's ``init_std``,
# IVON's ``hess_init`` (its initial std is 1/sqrt(ess * (hess_init + wd)): 0.03 and 0.01 at
# ess = 10^4). The Gaussian-VI methods' learning rates are Adam-like (they move log sigma by about
# lr per step, so a spread that starts far too small stays small at a small lr); IVON's are
# SGD-like, its step being preconditioned by ess * hessian. The VI learning rates sit one step
# above those of the first full run (ADVI / ProxScore 1e-3 and 3e-3, IVON 0.05 and 0.2), where the
# validation split chose the upper one on most tasks (docs/benchmarks.md).
DEFAULT_GRIDS: dict[str, list[dict]] = {
    "Adam": [{"lr": lr} for lr in (3e-4, 1e-3, 3e-3, 1e-2)],
    "ADVI": [{"lr": lr, "init_std": s} for lr, s in itertools.product((3e-3, 1e-2), (1e-3, 1e-2))],
    "IVON": [{"lr": lr, "hess_init": h} for lr, h in itertools.product((0.2, 0.5), (0.1, 1.0))],
    "ProxScore": [{"lr": lr, "init_std": s} for lr, s in itertools.product((3e-3, 1e-2), (1e-3, 1e-2))],
}
DEFAULT_GRIDS["ProxScore-flow"] = DEFAULT_GRIDS["ProxScore"]
DEFAULT_GRIDS["ProxScore-solved"] = [{"lr": lr, "init_curvature": h} for lr, h in itertools.product((3e-3, 1e-2),
                                                                                                      (1.0, 5.0))]


def add_grid_option(parser: argparse.ArgumentParser) -> None:
    """``--grid METHOD=JSON`` (repeatable): replace a method's validation grid; read by :func:`grids`."""
    parser.add_argument("--grid", action="append", default=[], metavar="METHOD=JSON",
                        help="replace a method's validation grid (a JSON list of configurations), e.g. "
                             "'ProxScore-solved=[{\"lr\": 0.003, \"init_curvature\": 5}]' (repeatable)")


def grids(parser: argparse.ArgumentParser, options: Sequence[str]) -> dict[str, list[dict]]:
    """:data:`DEFAULT_GRIDS` with the ``--grid`` options applied; a malformed one is a parser error."""
    out = dict(DEFAULT_GRIDS)
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or name not in CHOICES:
            parser.error(f"--grid needs METHOD=JSON with METHOD one of {CHOICES}, got {option!r}")
        try:
            grid = json.loads(value)
        except json.JSONDecodeError as error:
            parser.error(f"--grid {name}: not JSON ({error}): {value!r}")
        if not (isinstance(grid, list) and grid and all(isinstance(c, dict) and "lr" in c for c in grid)):
            parser.error(f"--grid {name}: a non-empty JSON list of configurations, each with an lr, got {value!r}")
        out[name] = grid
    return out


def smoke_grid(grid: Sequence[dict]) -> list[dict]:
    """The one configuration a smoke run tries: the grid's second, or the only one of a
    one-configuration ``--grid`` (which ``grid[1:2]`` alone would leave empty)."""
    return list(grid[1:2] or grid[:1])


def make(name: str, model: nn.Module, dataset_size: int, config: dict, seed: int, **vi_options):
    """The optimizer ``name`` over ``model``'s trainable parameters with one grid configuration.

    ``vi_options`` (e.g. ``prior_mean="init"``) go to ADVI and ProxScore only.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lr = config["lr"]
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=PRIOR_PRECISION / dataset_size)
    gen = torch.Generator().manual_seed(10_000 + seed)
    if name == "ADVI":
        return ADVI(params, lr=lr, dataset_size=dataset_size, prior_precision=PRIOR_PRECISION,
                    generator=gen, **_extra(config), **vi_options)
    if name in ("ProxScore", "ProxScore-flow", "ProxScore-solved"):
        family = "elementwise_flow" if name == "ProxScore-flow" else "gaussian"
        if name == "ProxScore-solved":
            vi_options = {"rule": "solved", **vi_options}
        return ProxScoreOptimizer(params, lr=lr, dataset_size=dataset_size, family=family,
                                  prior_precision=PRIOR_PRECISION, generator=gen, **_extra(config),
                                  **vi_options)
    if name == "IVON":
        import ivon

        return ivon.IVON(params, lr=lr, ess=dataset_size, hess_init=config.get("hess_init", 1.0),
                         weight_decay=PRIOR_PRECISION / dataset_size)
    raise ValueError(f"Unknown method {name!r}: choose one of {CHOICES}")


def _extra(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "lr"}


def train_step(opt, closure: Callable[[], Tensor]) -> float:
    """One step: ``closure`` computes the mean loss of a batch; the backward runs here."""
    opt.zero_grad()
    with training_sample(opt):
        loss = closure()
        loss.backward()
    opt.step()
    return float(loss.detach())


def train(opt, closure: Callable[[Tensor], Tensor], n: int, *, epochs: int, batch_size: int, seed: int,
          scheduler: Callable | None = None, progress=None) -> list[float]:
    """``epochs`` passes over ``n`` examples in shuffled batches; ``closure(idx)`` gives the loss.

    With ``scheduler`` (a function of the optimizer and the total step count returning an LR
    scheduler) the learning rate follows it, stepped once per batch. Returns the batch losses.
    """
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(n / batch_size)
    sched = scheduler(opt, steps) if scheduler is not None else None
    losses = []
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            losses.append(train_step(opt, lambda idx=idx: closure(idx)))
            if not math.isfinite(losses[-1]):
                return losses
            if sched is not None:
                sched.step()
            if progress is not None:
                progress.update(1)
    return losses


def cosine(opt, steps: int):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


@torch.no_grad()
def draws(opt, model: nn.Module, forward: Callable[[], Tensor], n_samples: int, seed: int = 1234) -> Tensor:
    """``[S, ...]``: ``forward()`` at ``n_samples`` posterior samples (``S = 1`` for a point estimate).

    The weights are restored afterwards; the draws come from a fixed seed, not the training RNG.
    """
    model.eval()
    if isinstance(opt, ProxScoreOptimizer):
        gen = torch.Generator().manual_seed(seed)
        outs = []
        with opt.sampled_params(gen) as redraw:
            for j in range(n_samples):
                if j:
                    redraw()
                outs.append(forward().float())
        return torch.stack(outs)
    if is_ivon(opt):
        return ivon_draws(opt, forward, n_samples, seed)
    return forward().float().unsqueeze(0)


@torch.no_grad()
def median_std(opt) -> float:
    """The median over all weights of the posterior std (0 for a point estimate).

    ADVI / ProxScore: ``posterior_std``; IVON: ``1 / sqrt(ess * (hess + weight_decay))``, the std it
    samples with.
    """
    if isinstance(opt, ProxScoreOptimizer):
        stds = torch.cat([opt.posterior_std(p).flatten() for g in opt.param_groups for p in g["params"]])
    elif is_ivon(opt):
        stds = ivon_posterior_std(opt)
    else:
        return 0.0
    return float(stds.float().median())


@dataclass
class Outcome:
    """One method's result: the chosen configuration, its validation score, per-seed test metrics."""

    method: str
    config: dict
    val_score: float
    tried: list[tuple[dict, float]]
    test: list[dict[str, float]] = field(default_factory=list)
    extra: list = field(default_factory=list)

    def summary(self, key: str) -> tuple[float, float]:
        values = torch.tensor([m[key] for m in self.test], dtype=torch.float64)
        std = float(values.std()) if len(values) > 1 else 0.0
        return float(values.mean()), std


def tune(method: str, grid: Sequence[dict], run: Callable[[str, dict, int], tuple[float, Callable]],
         seeds: Sequence[int]) -> Outcome:
    """Choose ``method``'s configuration on the validation split and run it on every seed.

    ``run(method, config, seed)`` trains once and returns ``(validation score, test)``, where
    ``test()`` evaluates the trained model on the test split and returns ``(metrics, extra)``: it is
    called only for the chosen configuration, so the tuning runs pay for validation alone. Lower
    scores are better and a non-finite score ranks last. The first seed's run of the chosen
    configuration is reused as its test result.
    """
    tried, kept = [], None
    for config in grid:
        score, test = run(method, config, seeds[0])
        score = score if math.isfinite(score) else math.inf
        tried.append((config, score))
        if kept is None or score < kept[0]:
            kept = (score, config, test)
    score, config, test = kept
    outcome = Outcome(method, config, score, tried)
    for seed in seeds:
        metrics, extra = test() if seed == seeds[0] else run(method, config, seed)[1]()
        outcome.test.append(metrics)
        outcome.extra.append(extra)
    return outcome


def fmt(outcome: Outcome, key: str, digits: int = 3, scale: float = 1.0) -> str:
    mean, std = outcome.summary(key)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def config_str(config: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in config.items())
