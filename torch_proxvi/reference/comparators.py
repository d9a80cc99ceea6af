"""IVON (``pip install ivon-opt``), the optimizer-style VI the benchmarks and examples compare
against, driven the way its authors drive it.

IVON differs from a ``torch.optim.Optimizer`` in two places: the forward and backward of a step
run inside ``sampled_params(train=True)`` (it collects the gradient at its fresh sample when the
block exits), and it samples from torch's global RNG. Its posterior is
:math:`N(\\mu, 1/(\\mathrm{ess}\\,(h + \\delta)))` per weight, with ``hess`` :math:`h` and
``weight_decay`` :math:`\\delta` (the prior precision over ``ess``).

This module does not import ``ivon``; it recognises an IVON optimizer by its class name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor


def is_ivon(opt) -> bool:
    return type(opt).__name__ == "IVON"


def training_sample(opt):
    """The block a training step's forward and backward run in: IVON's ``sampled_params(train=True)``,
    nothing for any other optimizer (ProxScore writes its sample into the weights itself)."""
    return opt.sampled_params(train=True) if is_ivon(opt) else contextlib.nullcontext()


@torch.no_grad()
def ivon_draws(opt, forward: Callable[[], Tensor], n_samples: int, seed: int) -> Tensor:
    """``[n_samples, ...]``: ``forward()`` at IVON samples from a fixed seed. The weights go back
    to the mean after each draw, and torch's global RNG to its state before the call."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    outs = []
    for _ in range(n_samples):
        with opt.sampled_params():
            outs.append(forward().float())
    torch.set_rng_state(state)
    return torch.stack(outs)


@torch.no_grad()
def ivon_posterior_std(opt) -> Tensor:
    """Every weight's posterior std, :math:`(\\mathrm{ess}\\,(h + \\delta))^{-1/2}`, flattened."""
    return torch.cat([(g["ess"] * (g["hess"] + g["weight_decay"])).rsqrt().flatten() for g in opt.param_groups])
