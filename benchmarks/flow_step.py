"""The dense flow's step: the library's layers against zuko's own, in one process.

    python benchmarks/flow_step.py --case banana --steps 300 --repeats 10
    python benchmarks/flow_step.py --case bnn --steps 700 --repeats 4

``family="flow"`` builds its couplings from ``torch_proxvi.families._flow_layers`` (zuko's
monotone affine and spline layers whose score's derivative forms no efficient-zero tensor) and
runs them through ``functional_call`` without its search for tied weights. This script swaps in
zuko's own layers and the default ``functional_call`` ("zuko") and back ("library"), alternating,
and fits the evidence tests' problems with each (``--case banana``: the 2-D banana from init_std 1;
``bnn``: the two-moons BNN's 5-weight head from init_std 0.5; the dense flow at lr 0.003, one
thread). It prints the CPU time per step of each fit (process time, steadier than wall time on a
shared machine) and whether both variants ended in the same state to the bit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import zuko

from torch_proxvi import ProxScoreOptimizer
from torch_proxvi.families import _flow_layers, flow
from torch_proxvi.reference import toy_targets as T

LIBRARY = {"layers": (_flow_layers.Affine, _flow_layers.Spline), "run": flow._run}
ZUKO = {"layers": (zuko.transforms.MonotonicAffineTransform, zuko.transforms.MonotonicRQSTransform),
        "run": lambda module, weights, *args: torch.func.functional_call(module, weights, args)}


def use(variant: dict) -> None:
    """Build the flow's templates anew from ``variant``'s layers and call."""
    flow._TEMPLATES.clear()
    _flow_layers.Affine, _flow_layers.Spline = variant["layers"]
    flow._run = variant["run"]


def fitter(case: str):
    if case == "banana":
        target = T.TARGETS["banana"]
        return lambda steps: T.fit(target, lambda ps: ProxScoreOptimizer(
            ps, 0.003, dataset_size=1, prior_precision=1e-6, init_std=1.0, family="flow"), steps=steps)
    problem = T.last_layer()
    return lambda steps: T.fit_last_layer(problem, lambda ps: ProxScoreOptimizer(
        ps, 0.003, dataset_size=len(problem.labels), prior_precision=1 / problem.prior_std**2, init_std=0.5,
        family="flow"), steps=steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("banana", "bnn"), default="banana")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fit = fitter(args.case)
    times: dict[str, list[float]] = {"zuko": [], "library": []}
    states: dict[str, list[torch.Tensor]] = {}
    for _ in range(args.repeats):
        for name, variant in (("zuko", ZUKO), ("library", LIBRARY)):
            use(variant)
            fit(5)  # templates built outside the timing
            start = time.process_time()
            opt, _ = fit(args.steps)
            times[name].append((time.process_time() - start) / args.steps * 1e3)
            states[name] = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    use(LIBRARY)
    same = all(torch.equal(a, b) for a, b in zip(states["zuko"], states["library"], strict=True))
    for name, ms in times.items():
        print(f"{name:8s} ms/step: " + " ".join(f"{t:.1f}" for t in ms) + f"; median {statistics.median(ms):.1f}")
    faster = sum(a < b for a, b in zip(times["library"], times["zuko"]))
    print(f"library / zuko: {statistics.median(times['library']) / statistics.median(times['zuko']):.2f} "
          f"(library faster in {faster} of {args.repeats} pairs); same final state to the bit: {same}")


if __name__ == "__main__":
    main()
