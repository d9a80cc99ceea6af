"""Validation of ProxScoreOptimizer's hyperparameters and gradients: errors that name the fix."""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import Tensor

__all__ = ["validate_group", "check_sparse"]

_REQUIRED: Any = object()
_FAMILIES = ("gaussian",)
_PRIOR_MEANS = ("zero", "init")
_MEAN_UPDATES = ("score", "residual")


def _check(cond: bool, name: str, value: Any, rule: str) -> None:
    if not cond:
        raise ValueError(f"Invalid {name}: {value!r} ({rule})")


def _is_real(v: Any) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def validate_group(group: dict[str, Any]) -> None:
    """Raise a ValueError naming the first invalid hyperparameter of ``group``."""
    n = group["dataset_size"]
    if n is _REQUIRED:
        raise TypeError(
            "ProxScoreOptimizer() missing required keyword argument 'dataset_size': pass the "
            "number of training examples, e.g. dataset_size=len(train_set); the gradient of a "
            "mean loss is multiplied by it to get the posterior score"
        )
    _check(_is_real(n) and math.isfinite(n) and n > 0, "dataset_size", n,
           "must be a positive number: the number of training examples")
    lr = group["lr"]
    _check(_is_real(lr) and 0 <= lr < math.inf, "learning rate", lr,
           "must be a finite float >= 0")
    for name in ("prior_precision", "init_std", "temperature"):
        v = group[name]
        _check(_is_real(v) and 0 < v < math.inf, name, v,
               "must be a finite float > 0")
    for name in ("prox_weight", "eps", "scale_lr_ratio"):
        v = group[name]
        _check(_is_real(v) and 0 <= v < math.inf, name, v,
               "must be a finite float >= 0")
    for name, low in (("mc_samples", 1), ("inner_steps", 1), ("warmup_steps", 0)):
        v = group[name]
        _check(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low, name, v,
               f"must be an int >= {low}")
    betas = group["betas"]
    _check(isinstance(betas, (tuple, list)) and len(betas) == 2
           and all(_is_real(b) and 0 <= b < 1 for b in betas),
           "betas", betas, "must be two floats in [0, 1)")
    for name, allowed in (("family", _FAMILIES), ("prior_mean", _PRIOR_MEANS),
                          ("mean_update", _MEAN_UPDATES)):
        _check(group[name] in allowed, name, group[name], f"choose one of {allowed}")
    for p in group["params"]:
        if p.is_complex():
            raise ValueError("ProxScoreOptimizer does not support complex parameters: "
                             "split them into real and imaginary float tensors (torch.view_as_real)")
        if not p.is_floating_point():
            raise ValueError(f"ProxScoreOptimizer needs floating-point parameters, got {p.dtype}")


def check_sparse(work: list[tuple[dict, Tensor]]) -> None:
    if any(p.grad.is_sparse for _, p in work):
        raise RuntimeError("ProxScoreOptimizer does not support sparse gradients: use a dense "
                           "embedding (nn.Embedding(..., sparse=False))")
