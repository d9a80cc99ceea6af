"""Everything a ``load_state_dict`` would install, checked and converted before anything changes.

:func:`prepare` reads a state_dict (after torch's load pre-hooks) and either raises a ValueError
naming the problem and the fix, or returns a :class:`Prepared` load that cannot fail to install:

* the saved extras (``"proxvi"``: the class that saved it, seed, skip count, RNG states), at the
  top level or inside the first parameter's state (where ``torch.distributed.checkpoint`` keeps
  them);
* the parameter groups: as many, of the same sizes, every value valid for this optimizer
  (:func:`~torch_proxvi._validation.validate_group` and the family's ``validate``), the same
  family and rule as the optimizer's own groups;
* each parameter's state: either not started (no ``step``: at most ``prior_mean``) or complete
  (every entry that the family's ``init_state`` creates, plus ``prior_mean`` with
  ``prior_mean="init"``), each tensor of the family's shape and real floating point (cast to the
  parameter's state dtype), ``step`` a whole number >= 0 (a Python number, the older torch format,
  becomes torch's float32 tensor). A state at step 0 is one that ``state_dict`` emitted for a
  parameter that had not stepped: it loads as not started;
* the RNG states: a uint8 tensor that a generator of its device accepts. The state of a device
  this machine lacks (a GPU checkpoint loaded on a CPU) is left out with a warning; samples on the
  devices present come from their own saved state, or from a generator seeded with the saved seed;
* the mode (``"train"``, or ``"eval"``; absent: train) and, saved in eval mode, each parameter's
  held training sample (``"held_sample"`` in its state: the parameter's shape and dtype). A
  state_dict saved in eval mode must hold one for every parameter whose posterior has started;
  one saved in train mode holds none.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from ._validation import validate_group
from .families import state_dtype

__all__ = ["EXTRAS", "HELD", "MODES", "Prepared", "prepare"]

EXTRAS = "proxvi"
HELD = "held_sample"  # a parameter's training sample, saved in eval mode (the weights hold the mean)
MODES = ("train", "eval")


@dataclass
class Prepared:
    """A checked load: the optimizer installs it as it is."""

    state: dict[Any, Any]
    param_groups: list[dict[str, Any]]
    seed: int
    skipped_steps: int
    rng: dict[str, Tensor]
    absent_devices: list[str] = field(default_factory=list)
    mode: str = "train"
    held: dict[Tensor, Tensor] = field(default_factory=dict)

    def warn_absent(self) -> None:
        for dev in self.absent_devices:
            warnings.warn(
                f"state_dict holds the sampling RNG state of {dev}, which this machine does not "
                f"have; it is left out (samples on this machine's devices come from their own "
                f"saved RNG state, or from a generator seeded with the saved seed)",
                RuntimeWarning, stacklevel=3)


_COMPLETE = ("load a complete state_dict (with torch.distributed.checkpoint, build the template with "
             "get_state_dict of an optimizer of this version)")


def _refuse(problem: str, fix: str) -> ValueError:
    return ValueError(f"Cannot load state_dict: {problem}; {fix}")


def _split_extras(saved_state: dict, param_ids: set) -> tuple[Any, dict]:
    """The extras (top level first, else the copy inside a parameter's state) and the state
    without the nested copy."""
    extras, state = None, dict(saved_state)
    for pid, entry in saved_state.items():
        if pid in param_ids and isinstance(entry, dict) and EXTRAS in entry:
            entry = dict(entry)
            nested = entry.pop(EXTRAS)
            extras = nested if extras is None else extras
            state[pid] = entry
    return extras, state


def _check_extras(opt, extras: Any) -> tuple[int, int, dict[str, Tensor], list[str], str]:
    name = type(opt).__name__
    if not isinstance(extras, dict):
        raise _refuse(f"it was not saved by {name} (no {EXTRAS!r} entry)",
                      f"load a state_dict from {name}.state_dict() of the same model")
    owner = extras.get("optimizer")
    if owner is not None and owner != name:
        raise _refuse(f"it was saved by {owner}, and this is {name}: their states hold other entries "
                      f"and another update", f"load it into {owner}, or start {name} afresh")
    missing = [k for k in ("seed", "skipped_steps", "rng") if k not in extras]
    if missing:
        raise _refuse(f"its {EXTRAS!r} entry lacks {missing}", "load a complete state_dict")
    seed, skipped = extras["seed"], extras["skipped_steps"]
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed < 2**64):
        raise _refuse(f"its seed {seed!r} is not an int in [0, 2**64)", "load an uncorrupted state_dict")
    if not (isinstance(skipped, numbers.Integral) and not isinstance(skipped, bool) and skipped >= 0):
        raise _refuse(f"its skipped_steps {skipped!r} is not an int >= 0", "load an uncorrupted state_dict")
    mode = extras.get("mode", "train")  # absent: saved before the mode was recorded, in train mode
    if not (isinstance(mode, str) and mode in MODES):
        raise _refuse(f"its mode {mode!r} is not one of {MODES}", "load an uncorrupted state_dict")
    rng, absent = _check_rng(extras["rng"])
    return int(seed), int(skipped), rng, absent, mode


def _device_present(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    module = getattr(torch, device.type, None)
    if module is None or not module.is_available():
        return False
    return device.index is None or device.index < module.device_count()


def _check_rng(saved: Any) -> tuple[dict[str, Tensor], list[str]]:
    if not isinstance(saved, dict):
        raise _refuse(f"its RNG entry is a {type(saved).__name__}, not a dict of device to state",
                      "load an uncorrupted state_dict")
    rng, absent = {}, []
    for dev, state in saved.items():
        try:
            device = torch.device(dev)
        except (RuntimeError, TypeError, ValueError):
            raise _refuse(f"its RNG entry names the device {dev!r}", "load an uncorrupted state_dict") from None
        if not _device_present(device):
            absent.append(str(device))
            continue
        if not (torch.is_tensor(state) and state.dtype == torch.uint8 and state.dim() == 1):
            what = f"{state.dtype} tensor of shape {tuple(state.shape)}" if torch.is_tensor(state) else type(state)
            raise _refuse(f"its RNG state of {dev} is a {what}, not a 1-D uint8 tensor",
                          "load an uncorrupted state_dict")
        try:
            torch.Generator(device=device).set_state(state.cpu())
        except (RuntimeError, ValueError) as e:
            raise _refuse(f"its RNG state of {dev} is not one a {device.type} generator accepts ({e})",
                          "load an uncorrupted state_dict") from None
        rng[str(device)] = state.detach().cpu().clone()
    return rng, absent


def _check_groups(opt, saved_groups: Any) -> list[dict[str, Any]]:
    """The groups the load installs: each saved group's values (keys it lacks, from an older
    version, keep the optimizer's) with the optimizer's parameters, validated."""
    if not isinstance(saved_groups, list) or not all(isinstance(g, dict) and "params" in g for g in saved_groups):
        raise _refuse("its 'param_groups' is not a list of groups", "load a state_dict from state_dict()")
    saved_sizes = [len(g["params"]) for g in saved_groups]
    sizes = [len(g["params"]) for g in opt.param_groups]
    if saved_sizes != sizes:
        raise _refuse(f"it does not match this model: its parameter groups hold {saved_sizes} parameters "
                      f"where this optimizer's groups hold {sizes}",
                      "load a checkpoint of the same model with the same param_groups")
    groups = []
    for i, (own, saved) in enumerate(zip(opt.param_groups, copy.deepcopy(saved_groups))):
        group = {**own, **saved, "params": own["params"]}  # torch keeps its "param_names" too
        try:
            validate_group(group)
            opt._family(group).validate(group)
        except (TypeError, ValueError, ImportError) as e:
            raise _refuse(f"its parameter group {i} is invalid: {e}", "load an uncorrupted state_dict") from None
        for key in ("family", "rule"):
            if group[key] != own[key]:
                raise _refuse(f"its parameter group {i} has {key}={group[key]!r} where this optimizer's has "
                              f"{key}={own[key]!r}", f"build the optimizer with {key}={group[key]!r} to load it")
        groups.append(group)
    return groups


def _check_step(value: Any, where: str) -> Tensor:
    """``step`` as torch's optimizers keep it: a float32 scalar tensor on the CPU."""
    if torch.is_tensor(value):
        ok = value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
        number = float(value.detach().reshape(())) if ok else math.nan
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        number = float(value) if ok else math.nan
    if not (math.isfinite(number) and number >= 0 and number == int(number)):
        raise _refuse(f"the step of {where} is {value!r}, not a whole number >= 0", "load an uncorrupted state_dict")
    return torch.tensor(number, dtype=torch.float32)


def _check_param_state(opt, p: Tensor, group: dict, pid: Any, saved: Any) -> dict | None:
    """The state ``p`` gets (None: none), converted: tensors copied to ``p``'s device and state dtype."""
    where = f"parameter {pid!r} (shape {tuple(p.shape)})"
    if not isinstance(saved, dict):
        raise _refuse(f"the state of {where} is a {type(saved).__name__}, not a dict", "load an uncorrupted state_dict")
    keys = set(saved)
    initial = set(opt._initial_state(p, group)) - {"step"}
    required = {"prior_mean"} if group["prior_mean"] == "init" else set()
    if "step" in keys:
        required |= initial
    elif keys & initial:
        raise _refuse(f"the state of {where} holds {sorted(keys & initial)} but no 'step': a partial state",
                      _COMPLETE)
    if required - keys:
        raise _refuse(f"the state of {where} lacks {sorted(required - keys)} (it holds {sorted(map(str, keys))}): "
                      f"a partial state cannot resume the posterior", _COMPLETE)
    out: dict[str, Any] = {}
    for key, v in saved.items():
        if key == "step":
            out[key] = _check_step(v, where)
        elif not torch.is_tensor(v):
            out[key] = v
        else:
            expected = opt._family(group).state_shape(p, key, group)
            if tuple(v.shape) != expected:
                raise _refuse(f"it does not match this model: saved {key!r} of shape {tuple(v.shape)} where this "
                              f"optimizer needs {expected} ({where})",
                              "load a checkpoint of the same model and parameter order")
            if not v.is_floating_point():
                raise _refuse(f"saved {key!r} of {where} is {v.dtype}: the state is real floating point",
                              "load an uncorrupted state_dict")
            out[key] = v.detach().to(device=p.device, dtype=state_dtype(p), copy=True)
    if "step" in out and float(out["step"]) == 0:  # emitted for a parameter that had not stepped
        out = {"prior_mean": out["prior_mean"]} if "prior_mean" in out else {}
    return out or None


def _check_held(p: Tensor, pid: Any, value: Any) -> Tensor:
    """A held training sample: a tensor of ``p``'s shape and dtype, copied to ``p``'s device."""
    where = f"parameter {pid!r} (shape {tuple(p.shape)}, {p.dtype})"
    if not torch.is_tensor(value):
        raise _refuse(f"the held training sample of {where} is a {type(value).__name__}, not a tensor",
                      "load an uncorrupted state_dict")
    if tuple(value.shape) != tuple(p.shape):
        raise _refuse(f"it does not match this model: the held training sample of {where} has shape "
                      f"{tuple(value.shape)}", "load a checkpoint of the same model and parameter order")
    if value.dtype != p.dtype:
        raise _refuse(f"the held training sample of {where} is {value.dtype}: it is the weights' own value, "
                      f"saved in their dtype", "load an uncorrupted state_dict of a model of the same dtype")
    return value.detach().to(device=p.device, copy=True)


def prepare(opt, state_dict: Any) -> Prepared:
    """Check ``state_dict`` for ``opt`` and convert it; raise ValueError before anything changes."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
        raise _refuse("it is not an optimizer state_dict (a dict with 'state' and 'param_groups')",
                      "pass optimizer.state_dict() or what torch.load returned for it")
    groups = state_dict.get("param_groups")
    saved_ids = list(chain.from_iterable(g["params"] for g in groups)) if isinstance(groups, list) and all(
        isinstance(g, dict) and "params" in g for g in groups) else []
    extras, saved_state = _split_extras(state_dict["state"], set(saved_ids))
    extras_top = state_dict.get(EXTRAS)
    seed, skipped, rng, absent, mode = _check_extras(opt, extras_top if extras_top is not None else extras)
    groups = _check_groups(opt, groups)
    params = [(g, p) for g in groups for p in g["params"]]
    id_map = dict(zip(saved_ids, params))
    state: dict[Any, Any] = {}
    held: dict[Tensor, Tensor] = {}
    for pid, (group, _) in id_map.items():
        if group["prior_mean"] == "init" and pid not in saved_state:
            saved_state[pid] = {}  # checked below: lacks its prior mean
    for pid, saved in saved_state.items():
        if pid in id_map:
            group, p = id_map[pid]
            sample = None
            if isinstance(saved, dict) and HELD in saved:
                if mode != "eval":
                    raise _refuse(f"the state of parameter {pid!r} holds a held training sample, but the "
                                  f"state_dict was saved in {mode} mode", "load an uncorrupted state_dict")
                saved = dict(saved)
                sample = _check_held(p, pid, saved.pop(HELD))
            entry = _check_param_state(opt, p, group, pid, saved)
            if entry is not None:
                state[p] = entry
                if "step" in entry and mode == "eval":
                    if sample is None:
                        raise _refuse(
                            f"it was saved in eval mode (the weights held the posterior mean) but lacks the "
                            f"held training sample of parameter {pid!r}, so training could not resume on the "
                            f"training sample",
                            "load a complete state_dict (with torch.distributed.checkpoint, build the template "
                            "with the fresh optimizer in eval mode, so that it names the held samples: "
                            "docs/api.md, state_dict())")
                    held[p] = sample  # a parameter that has not started holds its weights: nothing to hold
        else:  # not a parameter's: torch copies it through
            state[pid] = saved
    return Prepared(state, groups, seed, skipped, rng, absent, mode, held)
