"""The hyperparameters of one optimizer step, as one object.

:class:`StepHyper` is built once per step and parameter batch from the group dict
(:meth:`StepHyper.of`) and passed to every kernel. Its numeric fields are Python floats on the
eager paths; the compiled path packs them into one tensor (:meth:`StepHyper.numbers`) and
rebuilds the object inside the kernel from 0-dim tensors (:meth:`StepHyper.from_numbers`), so a
new learning rate or step count never recompiles. The kernels use the fields with arithmetic
operators only, which works for both. The remaining fields are static: they pick code, and a
compiled kernel is specialised on them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["StepHyper", "NUMERIC_FIELDS"]

NUMERIC_FIELDS = ("lr", "scale_lr", "beta1", "beta2", "eps", "score_scale", "prior_precision", "prox_weight",
                  "step")


class StepHyper(NamedTuple):
    lr: float                 # Adam learning rate of the location (the mean)
    scale_lr: float           # Adam learning rate of the scale and shape parameters
    beta1: float
    beta2: float
    eps: float
    score_scale: float        # -dataset_size / temperature: the score is grad * score_scale - prior term
    prior_precision: float
    prox_weight: float
    step: float               # Adam steps taken before this one
    rule: str = "proximal"    # which update (a key of kernels.dispatch.RULES)
    mean_update: str = "score"
    inner_steps: int = 1
    update_scale: bool = True  # False during warm-up

    @classmethod
    def of(cls, group: dict, step: float) -> StepHyper:
        """The hyperparameters of ``group`` for the optimizer step that follows Adam step ``step``."""
        beta1, beta2 = group["betas"]
        outer_steps = step // group["inner_steps"]
        return cls(
            lr=float(group["lr"]), scale_lr=float(group["lr"] * group["scale_lr_ratio"]),
            beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
            score_scale=-float(group["dataset_size"]) / float(group["temperature"]),
            prior_precision=float(group["prior_precision"]), prox_weight=float(group["prox_weight"]),
            step=float(step), rule=group.get("rule", "proximal"), mean_update=group["mean_update"],
            inner_steps=int(group["inner_steps"]), update_scale=bool(outer_steps >= group["warmup_steps"]))

    def numbers(self, dtype: torch.dtype, device) -> Tensor:
        """The numeric fields as one tensor (the compiled kernel's argument)."""
        return torch.tensor([getattr(self, f) for f in NUMERIC_FIELDS], dtype=dtype, device=device)

    def static(self) -> tuple:
        return tuple(getattr(self, f) for f in self._fields[len(NUMERIC_FIELDS):])

    @classmethod
    def from_numbers(cls, numbers: Tensor, static: tuple) -> StepHyper:
        return cls(*numbers.unbind(), *static)
