"""Validation of ProxScoreOptimizer's hyperparameters and gradients: errors that name the fix."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from . import families
from .kernels.noise import is_dtensor

__all__ = ["validate_group", "check_sparse", "check_joint", "gradients_finite", "scores_finite"]

_REQUIRED: Any = object()
_LARGE_NUMEL = 1 << 14
_PRIOR_MEANS = ("zero", "init")
_MEAN_UPDATES = (None, "score", "residual")


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
        if name == "scale_lr_ratio" and v is None:  # the family's default (Family.validate)
            continue
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
    for name, allowed in (("family", families.names()), ("prior_mean", _PRIOR_MEANS),
                          ("mean_update", _MEAN_UPDATES)):
        _check(group[name] in allowed, name, group[name], f"choose one of {allowed}")
    for p in group["params"]:
        if p.is_complex():
            raise ValueError("ProxScoreOptimizer does not support complex parameters: "
                             "split them into real and imaginary float tensors (torch.view_as_real)")
        if not p.is_floating_point():
            raise ValueError(f"ProxScoreOptimizer needs floating-point parameters, got {p.dtype}")
        if is_dtensor(p) and group["family"] != "gaussian":
            raise ValueError(f"family={group['family']!r} does not support sharded (DTensor, FSDP2 "
                             "fully_shard) parameters yet: use family='gaussian' for sharded groups")


def check_sparse(work: list[tuple[dict, Tensor]]) -> None:
    if any(p.grad.is_sparse for _, p in work):
        raise RuntimeError("ProxScoreOptimizer does not support sparse gradients: use a dense "
                           "embedding (nn.Embedding(..., sparse=False))")


def check_joint(work: list[tuple[dict, Tensor]], is_joint) -> None:
    """A joint family's group must get a gradient for all of its parameters or none."""
    counts: dict[int, tuple[dict, int]] = {}
    for group, _ in work:
        if is_joint(group):
            counts[id(group)] = (group, counts.get(id(group), (group, 0))[1] + 1)
    for group, count in counts.values():
        if count != len(group["params"]):
            raise RuntimeError(
                f"family={group['family']!r} models all parameters of its group jointly and "
                f"needs a gradient for every one of them ({count} of {len(group['params'])} "
                f"have one): leave parameters that get no gradient out of that group, or set "
                f"requires_grad=False on them before building the optimizer")


def _max_abs(grads: list[Tensor], device: torch.device) -> list[Tensor]:
    """Tensors whose max is the largest |g| over ``grads``, NaN where one holds a NaN.

    ``_foreach_norm(inf)`` is not vectorised on the CPU (15 ms at 10M numbers here): there each
    large gradient gets one ``aminmax`` pass (2.5 ms at 10M) and the small ones share one
    ``_foreach_norm``. Elsewhere, and for sharded (DTensor) gradients, whose norm is global,
    ``_foreach_norm`` does all.
    """
    if device.type != "cpu" or any(is_dtensor(g) for g in grads):
        return list(torch._foreach_norm(grads, float("inf")))
    large = [g for g in grads if g.numel() >= _LARGE_NUMEL]
    small = [g for g in grads if g.numel() < _LARGE_NUMEL]
    out = list(torch._foreach_norm(small, float("inf"))) if small else []
    if large:
        lows, highs = zip(*(torch.aminmax(g) for g in large))
        out += [torch.stack(lows).abs().max(), torch.stack(highs).abs().max()]
    return out


def gradients_finite(work: list[tuple[dict, Tensor]]) -> bool:
    """One sync per device: is every N * grad / T finite in the state dtype?"""
    by_device: dict[torch.device, list[Tensor]] = {}
    batches: dict[tuple, tuple[dict, list[Tensor]]] = {}
    for group, p in work:
        batches.setdefault((id(group), p.device), (group, []))[1].append(p.grad)
    for (_, device), (group, grads) in batches.items():
        worst = torch.stack([n.to(families.state_dtype(n)) for n in _max_abs(grads, device)]).max()
        scaled = worst * (group["dataset_size"] / group["temperature"])
        by_device.setdefault(device, []).append(scaled.isfinite())
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())


def scores_finite(stats: dict) -> bool:
    """One sync per device: are all scores finite? Each accumulator's ``probe`` is non-finite
    wherever a score was (for the Gaussian ``<u s>``: 0 * inf is NaN too)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for st in stats.values():
        probe = st.probe
        by_device.setdefault(probe.device, []).append(probe.isfinite().all())
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())
