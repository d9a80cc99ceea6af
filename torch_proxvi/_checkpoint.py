"""Exact checkpoints: ``state_dict`` with the sampling RNG, a ``load_state_dict`` that refuses
another model's state before loading anything, and pickling. A mixin of
:class:`~torch_proxvi.ProxScoreOptimizer`."""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch import Tensor

__all__ = ["Checkpointing"]


EXTRAS = "proxvi"


class Checkpointing:
    """Adds the optimizer's own entries (seed, RNG states, skip count) to torch's state_dict.

    They are stored twice: under the top-level key ``"proxvi"``, and inside the state of the
    first parameter that has state. ``torch.distributed.checkpoint``'s
    ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (the FSDP2 way to checkpoint)
    keep only ``"state"`` and ``"param_groups"``; the second copy survives them.
    """

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        extras = {
            "seed": self._seed,
            "skipped_steps": self.skipped_steps,
            "rng": {dev: g.get_state() for dev, g in self._generators.items()},
        }
        sd[EXTRAS] = extras
        if sd["state"]:
            first = next(iter(sd["state"]))
            sd["state"][first] = {**sd["state"][first], EXTRAS: extras}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(EXTRAS, None)
        state_dict["state"] = dict(state_dict.get("state", {}))
        for pid, saved in state_dict["state"].items():
            if EXTRAS in saved:
                saved = dict(saved)
                nested = saved.pop(EXTRAS)
                extra = nested if extra is None else extra
                state_dict["state"][pid] = saved
        if extra is None:
            raise ValueError("this state_dict was not saved by ProxScoreOptimizer (no 'proxvi' "
                             "entry): load a state_dict from ProxScoreOptimizer.state_dict()")
        saved_sizes = [len(g["params"]) for g in state_dict["param_groups"]]
        sizes = [len(g["params"]) for g in self.param_groups]
        if saved_sizes != sizes:
            raise ValueError(
                f"state_dict does not match this model: its parameter groups hold {saved_sizes} "
                f"parameters where this optimizer's groups hold {sizes}; load a checkpoint of the "
                f"same model with the same param_groups")
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        id_map = dict(zip(saved_ids, params))
        for pid, saved in state_dict["state"].items():
            p = id_map.get(pid)
            for key, v in saved.items():
                if p is None or key == "step" or not torch.is_tensor(v):
                    continue
                expected = self._state_shape(p, key)
                if tuple(v.shape) != expected:
                    raise ValueError(
                        f"state_dict does not match this model: saved {key!r} of shape "
                        f"{tuple(v.shape)} where this optimizer needs {expected} (parameter of "
                        f"shape {tuple(p.shape)}); load a checkpoint of the same model and "
                        f"parameter order")
        super().load_state_dict(state_dict)
        # torch casts state to the parameter dtype; the variational state stays float32/64.
        for pid, saved in state_dict["state"].items():
            p = id_map.get(pid)
            if p is not None:
                for k, v in saved.items():
                    if k != "step":
                        self.state[p][k] = v.to(device=p.device, copy=True)
        self._seed = int(extra["seed"])
        self.skipped_steps = int(extra["skipped_steps"])
        for dev, rng_state in extra["rng"].items():
            self._generator(torch.device(dev)).set_state(rng_state.cpu())

    def _state_shape(self, p: Tensor, key: str) -> tuple[int, ...]:
        """The shape of state entry ``key`` of parameter ``p`` (checked when loading)."""
        group = self._group_of(p)
        return self._family(group).state_shape(p, key, group)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(foreach=self.foreach, compiled=self.compiled, skipped_steps=self.skipped_steps,
                     _mode=self._mode, _held=self._held, _seed=self._seed, _generators=self._generators)
        return state
