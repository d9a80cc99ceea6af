r"""Probe: the solved rule's spread held at the Adam rule's until the mean's Adam steps shrink.

    python benchmarks/spread_hold.py [--threshold 0.3] [--together | --release-step K] -- SCRIPT [ARGS ...]

Runs ``SCRIPT`` (an example or a benchmark, with its own arguments) with every
``ProxScoreOptimizer`` group of ``rule="solved"`` changed after each step. Each weight tensor
is *held* at first: its scale is ``--hold-std`` (the Adam rule's start, 1e-3) and the precision's
update is undone, while its mean takes the rule's Adam steps. It is *released* on the first step
where its mean's Adam steps have shrunk, measured on the whole tensor by

.. math::
    r = \sqrt{\textstyle\sum \hat m^2 / \sum \hat v}

(:math:`\hat m`, :math:`\hat v` Adam's bias-corrected moments of the mean's gradient, so r is
about the RMS of the mean's Adam step in units of lr): r is 1 for a constant gradient and, where
the gradient is pure noise, :math:`\sqrt{(1-\beta_1)(1+\beta_1^t)/((1+\beta_1)(1-\beta_1^t))}`
after t steps (0.71, 0.45, 0.33, 0.26 at t = 2, 5, 10, 20; 0.23 in the long run), below 0.3 from
t = 13 on. A released tensor's scale restarts at the rule's start :math:`\sigma_0` and the rule
runs unchanged. The sample in the weights is rescaled with the scale (the same noise), so every
step's statistics are those of the scale it was drawn at.

``--together`` releases every tensor at once, on the first step where every tensor's r is below
the threshold; ``--release-step K`` releases every tensor at step K (a fixed delay, no criterion).
On exit it prints how many tensors were released and when, and the quantiles of r over the weight
tensors at a few steps. It patches the optimizer class for one process: a probe, not an option
of the library (docs/benchmarks.md, "Probe: the spread held until the mean's Adam steps shrink").
"""

from __future__ import annotations

import argparse
import math
import runpy
import sys
from collections.abc import Callable

import torch

from torch_proxvi import ProxScoreOptimizer
from torch_proxvi.families.base import start_std


def adam_step_ratio(state: dict, betas: tuple[float, float]) -> float:
    """r of the module docstring for one weight tensor's state."""
    t = float(state["step"])
    m = state["mean_exp_avg"] / (1 - betas[0] ** t)
    v = state["mean_exp_avg_sq"] / (1 - betas[1] ** t)
    return math.sqrt(float(m.square().sum()) / max(float(v.sum()), 1e-300))


def _solved_states(opt):
    for group in opt.param_groups:
        if group.get("rule") == "solved":
            for p in group["params"]:
                st = opt.state.get(p, {})
                if "log_scale" in st and "mean_exp_avg" in st:
                    yield group, p, st


def install(threshold: float = 0.3, hold_std: float = 1e-3, log: list | None = None, *,
            release_step: int | None = None, together: bool = False) -> Callable[[], None]:
    """Patch :class:`ProxScoreOptimizer` so that every optimizer built afterwards holds its
    solved groups' spread (module docstring); ``log`` collects one dict per optimizer. Returns
    the function that undoes the patch (for optimizers built afterwards)."""
    original = ProxScoreOptimizer.__init__
    hold = math.log(hold_std)
    log = [] if log is None else log

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        record = {"released": {}, "tensors": 0, "ratios": {}}
        log.append(record)

        @torch.no_grad()
        def after_step(opt, _args, _kwargs):
            ratios = {p: adam_step_ratio(st, group["betas"]) for group, p, st in _solved_states(opt)}
            everyone = bool(ratios) and max(ratios.values()) < threshold
            for group, p, st in _solved_states(opt):
                step = int(float(st["step"]))
                record["tensors"] += step == 1
                if p.dim() >= 2:
                    record["ratios"].setdefault(step, []).append(ratios[p])
                if p in record["released"]:
                    continue
                release = everyone if together else ratios[p] < threshold
                if release_step is not None:
                    release = step >= release_step
                target = math.log(start_std(group, p)) if release else hold
                if release:
                    record["released"][p] = step
                scale = torch.exp(target - st["log_scale"])
                p.copy_(st["mean"] + (p.to(st["mean"].dtype) - st["mean"]) * scale)
                st["log_scale"].fill_(target)

        self.register_step_post_hook(after_step)

    ProxScoreOptimizer.__init__ = __init__

    def restore() -> None:
        ProxScoreOptimizer.__init__ = original

    return restore


def report(log: list) -> None:
    for i, record in enumerate(log):
        steps = sorted(record["released"].values())
        if not record["tensors"]:
            continue
        median = steps[len(steps) // 2] if steps else None
        print(f"[spread_hold] optimizer {i}: {len(steps)} of {record['tensors']} solved tensors released, "
              f"steps {steps[:1]}..{steps[-1:]} (median {median})", file=sys.stderr)
        ratios = record["ratios"]
        for step in sorted(ratios):
            if step in (1, 2, 5, 10, 20, 50) or step % 100 == 0 or step == max(ratios):
                q = torch.tensor(ratios[step]).quantile(torch.tensor([0.1, 0.5, 0.9])).tolist()
                print(f"[spread_hold]   step {step}: r of the weight tensors, 10/50/90 %: "
                      f"{q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--hold-std", type=float, default=1e-3)
    parser.add_argument("--together", action="store_true",
                        help="release every tensor at once, on the first step where every tensor's r is below")
    parser.add_argument("--release-step", type=int, default=None,
                        help="release every tensor at this step instead (a fixed delay, no criterion)")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    a = parser.parse_args()
    log: list = []
    install(a.threshold, a.hold_std, log, release_step=a.release_step, together=a.together)
    sys.argv = [a.script, *a.args]
    try:
        runpy.run_path(a.script, run_name="__main__")
    finally:
        report(log)


if __name__ == "__main__":
    main()
