"""Validation of ProxScoreOptimizer's hyperparameters and gradients: errors that name the fix."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from . import families
from .kernels.adam import grad_limit
from .kernels.gaussian import LOG_SCALE_MAX, STD_RANGE
from .kernels.noise import is_dtensor

__all__ = ["validate_group", "validate_flags", "check_count", "check_sparse", "check_joint", "score_limit",
           "gradient_codes", "skip_cause", "scores_finite"]

_REQUIRED: Any = object()
_LARGE_NUMEL = 1 << 14
_PRIOR_MEANS = ("zero", "init")
_MEAN_UPDATES = (None, "score", "residual", "newton")
_FLOAT32 = torch.finfo(torch.float32)
#: eps >= sqrt(smallest normal): where g * g underflows to 0, m / eps stays of the order of 1
_EPS_MIN = math.sqrt(_FLOAT32.tiny)
#: prior_precision * var must stay a finite float32 number for every var the state can hold
_PRIOR_PRECISION_MAX = _FLOAT32.max / math.exp(2 * LOG_SCALE_MAX)


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
        if name == "init_std" and v is None:  # the rule's default (Family.validate)
            continue
        _check(_is_real(v) and 0 < v < math.inf, name, v,
               "must be a finite float > 0")
    if group["init_std"] is not None:
        check_init_std(group["init_std"])
    h0 = group.get("init_curvature")
    _check(h0 is None or (_is_real(h0) and 0 <= h0 < math.inf), "init_curvature", h0,
           "must be a finite float >= 0: a guess of the per-example curvature of the loss, which sets the "
           "initial precision")
    kappa = group.get("relative_init_curvature")
    _check(kappa is None or (_is_real(kappa) and 0 <= kappa < math.inf), "relative_init_curvature", kappa,
           "must be a finite float >= 0: a guess of the per-example curvature in units of each weight tensor's "
           "scale, which sets the initial precision of tensors with two or more dimensions")
    _check(group["prior_precision"] <= _PRIOR_PRECISION_MAX, "prior_precision", group["prior_precision"],
           f"must be <= {_PRIOR_PRECISION_MAX:.3g}, so that prior_precision * variance stays a finite "
           f"float32 number for every variance the state can hold")
    ratio = n / group["temperature"]
    if not _FLOAT32.tiny <= ratio <= _FLOAT32.max:
        raise ValueError(
            f"Invalid dataset_size / temperature: {n!r} / {group['temperature']!r} = {ratio:.3g} (the score "
            f"scale must be a normal float32 number, in [{_FLOAT32.tiny:.3g}, {_FLOAT32.max:.3g}]: check the "
            f"dataset_size and the temperature)")
    for name in ("prox_weight", "eps", "scale_lr_ratio"):
        v = group[name]
        if name == "scale_lr_ratio" and v is None:  # the family's default (Family.validate)
            continue
        _check(_is_real(v) and 0 <= v < math.inf, name, v,
               "must be a finite float >= 0")
    _check(group["eps"] >= _EPS_MIN, "eps", group["eps"],
           f"must be > 0: at least {_EPS_MIN:.3g}, the square root of the smallest normal float32. Adam "
           f"steps by m / (sqrt(v) + eps), and v is 0 where a gradient's square underflows (|g| < {_EPS_MIN:.2g}): "
           f"a smaller eps makes that step 0 / 0 or orders of magnitude larger than lr")
    for name, low in (("mc_samples", 1), ("inner_steps", 1), ("warmup_steps", 0)):
        check_count(name, group[name], low)
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


def check_init_std(init_std: float) -> None:
    low, high = STD_RANGE
    _check(low <= init_std <= high, "init_std", init_std,
           f"must be in [{low:.3g}, {high:.3g}], where the scale is kept: exp(2 * log_scale) is then "
           f"a normal float32 number")


def check_count(name: str, value: Any, low: int) -> None:
    """An integral number >= ``low``: an int or a numpy integer, not a bool."""
    _check(isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low, name, value,
           f"must be an int >= {low}")


def validate_flags(foreach: Any, compiled: Any, generator: Any) -> None:
    """The optimizer-wide switches: ``foreach`` and ``compiled`` a bool or None, ``generator`` a
    ``torch.Generator`` or None."""
    for name, value in (("foreach", foreach), ("compiled", compiled)):
        _check(value is None or isinstance(value, bool), name, value, "True, False or None")
    _check(generator is None or isinstance(generator, torch.Generator), "generator", generator,
           "a torch.Generator or None")
    if compiled and foreach is False:
        raise ValueError("Invalid compiled=True with foreach=False: compiled=True runs the packed fast step, "
                         "foreach=False the single-tensor reference; choose one")


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


def score_limit(dtype: torch.dtype) -> float:
    """The largest likelihood score ``|dataset_size / temperature * grad|`` a step takes in state
    dtype ``dtype`` (4.6e18 in float32): the location's gradient ``-2 * score`` then stays within
    what Adam takes unclamped, and its second moment finite (:func:`.kernels.adam.grad_limit`)."""
    return grad_limit(dtype) / 2


def gradient_codes(work: list[tuple[dict, Tensor]]) -> list[tuple[Tensor, float, torch.dtype]]:
    """For each (group, device, state dtype) batch of ``work``, without a sync: the largest ``|grad|`` (a 0-dim
    tensor, NaN where a gradient holds a NaN), the score scale ``N / T`` and the state dtype.
    :func:`skip_cause` reads them."""
    batches: dict[tuple, tuple[dict, list[Tensor]]] = {}
    for group, p in work:
        if p.grad.numel():  # a zero-element gradient has no numbers to check
            batches.setdefault((id(group), p.device, families.state_dtype(p)), (group, []))[1].append(p.grad)
    codes = []
    for (_, device, dtype), (group, grads) in batches.items():
        worst = torch.stack([n.to(dtype) for n in _max_abs(grads, device)]).max()
        if is_dtensor(worst):  # sharded gradients: the norm over every rank's shard
            worst = worst.full_tensor()
        codes.append((worst, group["dataset_size"] / group["temperature"], dtype))
    return codes


#: a skip's cause: (what happened, what to do)
NON_FINITE = ("non-finite gradients", "Lower the learning rate or use a GradScaler if this repeats.")


def skip_cause(codes: list[tuple[Tensor, float, torch.dtype]]) -> tuple[str, str] | None:
    """Why a step with these :func:`gradient_codes` must be skipped, as (what happened, what to do);
    None: it need not. One sync per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, (worst, _, _) in enumerate(codes):
        by_device.setdefault(worst.device, []).append(i)
    values = [0.0] * len(codes)
    for index in by_device.values():
        for i, value in zip(index, torch.stack([codes[i][0] for i in index]).tolist()):
            values[i] = value
    too_large = None
    for value, (_, ratio, dtype) in zip(values, codes):
        if not math.isfinite(value):
            return NON_FINITE
        limit = score_limit(dtype)
        if value * ratio > limit and too_large is None:
            too_large = (f"a gradient too large: its score dataset_size / temperature * grad reaches "
                         f"{value * ratio:.3g}, past {limit:.3g}, where Adam's second moment would overflow "
                         f"{str(dtype).removeprefix('torch.')} to a non-finite value",
                         "Clip the gradients (torch.nn.utils.clip_grad_norm_), or check the loss's scale, "
                         "if this repeats.")
    return too_large


def scores_finite(stats: dict) -> bool:
    """One sync per device: are all scores finite? Each accumulator's ``probe`` is non-finite
    wherever a score was (for the Gaussian ``<u s>``: 0 * inf is NaN too)."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for st in stats.values():
        probe = st.probe
        by_device.setdefault(probe.device, []).append(probe.isfinite().all())
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())


#: keys torch itself puts into parameter groups (named parameters, LR schedulers)
_TORCH_GROUP_KEYS = ("params", "param_names", "initial_lr")
#: arguments of the optimizer that are not group keys
_OPTIMIZER_ONLY = ("generator", "foreach", "compiled")


def check_group_keys(group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a parameter-group key that misspells a valid one (it would be ignored silently), or
    an optimizer-only argument given as a group key. Other unknown keys are the caller's metadata,
    as torch allows (a group ``name``, timm's ``weight_decay`` and ``lr_scale``)."""
    import difflib

    valid = sorted(set(defaults) | set(_TORCH_GROUP_KEYS)
                   | {k for name in families.names() for k in families.get(name).options})
    for key in group:
        if key in valid:
            continue
        if key in _OPTIMIZER_ONLY:
            raise ValueError(f"Invalid parameter-group key {key!r}: it is an argument of the optimizer, not of "
                             f"a group; pass it as ProxScoreOptimizer(..., {key}=...)")
        nearest = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
        if nearest:
            raise ValueError(f"Invalid parameter-group key {key!r}: did you mean {nearest[0]!r}? (a misspelled "
                             f"key would be ignored and the default used)")
