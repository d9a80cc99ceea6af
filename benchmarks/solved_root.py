"""Which root of the solved precision step (``rule="solved"``) under mini-batch noise.

    python benchmarks/solved_root.py                       # the table in docs/benchmarks.md (about 4 min)
    python benchmarks/solved_root.py --seeds 1 --roots exact first-order

The precision ratio p = P / P_t solves 4ap^3 + 4bp^2 + lam (p - 1) = 0 (torch_proxvi/kernels/newton.py).
Each root below replaces ``newton.precision_ratio`` for both mean updates, in the loop of
``benchmarks/posterior_quality.py: run`` (6000 score evaluations, its lr decay), on the problems
and lrs where the choice showed:

* ``exact``: the bracketed root after ``NEWTON_ITERS`` safeguarded Newton steps (the Newton
  mean's root in the library);
* ``first-order``: the linearised root (lam - 4b) / (lam + 4a) clamped to the bracket (the Adam
  mean's root in the library);
* ``log``: exp(-4 (a + b) / (lam + 4a)), the first-order step taken in log p, in the bracket;
* ``quadratic``: below 1, the root of 4bp^2 + (4a + lam) p - lam (the cubic term linearised), the
  first-order root above 1, in the bracket.

Reported: the final KL (logistic regression: to the mean-field projection of HMC; BNN: the
predictive KL to HMC), one number per seed. A second table runs the library's step (the
first-order root for the Adam mean) on logistic regression at batch 32 with a smaller precision
trust fraction rho = lr * ``scale_lr_ratio`` for the same mean lr.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import posterior_quality as PQ  # noqa: E402
import problems as P  # noqa: E402

from torch_proxvi import ProxScoreOptimizer  # noqa: E402
from torch_proxvi.kernels import newton  # noqa: E402

EXACT = newton.precision_ratio


def _bracket(a, b, rho):
    rho = torch.as_tensor(rho, dtype=a.dtype).clamp(1e-30, newton.RHO_MAX)
    lam = 4 * (1 - rho) / rho
    a = a.clamp_min(0)
    below = a + b > 0
    lo = torch.where(below, lam / (lam + 4 * a + 4 * b.clamp_min(0)), 1.0)
    linear = (lam - 4 * b) / (lam + 4 * a)
    hi = torch.where(below, 1.0, torch.minimum(-b / a.clamp_min(1e-38), newton.CAP * linear).clamp_min(1))
    return lam, a, lo, hi, linear


def _log(a, b, rho, iterations=None):
    lam, a, lo, hi, _ = _bracket(a, b, rho)
    return torch.exp(-4 * (a + b) / (lam + 4 * a)).clamp(min=lo, max=hi)


def _quadratic(a, b, rho, iterations=None):
    lam, a, lo, hi, linear = _bracket(a, b, rho)
    c = 4 * a + lam
    quad = 2 * lam / (c + torch.sqrt((c * c + 16 * b * lam).clamp_min(0)))
    return torch.where(a + b > 0, quad, linear).clamp(min=lo, max=hi)


ROOTS = {
    "exact": lambda a, b, rho, iterations=None: EXACT(a, b, rho, newton.NEWTON_ITERS),
    "first-order": lambda a, b, rho, iterations=None: EXACT(a, b, rho, 0),
    "log": _log,
    "quadratic": _quadratic,
}
# (problem, mean_update, lr, batch): the settings of the posterior-quality table that moved
RUNS = [("logistic", "score", 0.03, 32), ("logistic", "newton", 0.03, 32), ("bnn", "newton", 0.03, None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--roots", nargs="*", default=list(ROOTS), choices=list(ROOTS))
    ap.add_argument("--ratios", nargs="*", type=float, default=[1.0, 0.5, 0.3, 0.1],
                    help="scale_lr_ratio values of the second table ('--ratios' alone: none)")
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    torch.set_num_threads(1)
    start = time.time()
    problems = {"logistic": P.logistic(), "bnn": P.bnn()}
    print("| problem | mean | lr | batch | " + " | ".join(args.roots) + " |")
    print("|---|---|---|---|" + "---|" * len(args.roots))
    for name, mean_update, lr, batch in RUNS:
        PQ.METHODS["root"] = (lambda ps, lr, n, mu=mean_update: ProxScoreOptimizer(
            ps, lr, dataset_size=n, rule="solved", mean_update=mu), 1, (lr,), True, False)
        cells = []
        for root in args.roots:
            newton.precision_ratio = ROOTS[root]
            finals = [PQ.final(PQ.run(problems[name], "root", lr, batch=batch, evals=6000, seed=s)[1])
                      for s in range(args.seeds)]
            cells.append(" / ".join(f"{v:.3g}" for v in finals))
        newton.precision_ratio = EXACT
        print(f"| {name} | {mean_update} | {lr} | {batch or 'full'} | " + " | ".join(cells) + " |", flush=True)
    if args.ratios:
        print("\n| logistic, batch 32, Adam mean, lr 0.03: scale_lr_ratio | rho | final KL per seed |\n|---|---|---|")
    for ratio in args.ratios:
        PQ.METHODS["ratio"] = (lambda ps, lr, n, r=ratio: ProxScoreOptimizer(
            ps, lr, dataset_size=n, rule="solved", scale_lr_ratio=r), 1, (0.03,), True, False)
        finals = [PQ.final(PQ.run(problems["logistic"], "ratio", 0.03, batch=32, evals=6000, seed=s)[1])
                  for s in range(args.seeds)]
        print(f"| {ratio:g} | {0.03 * ratio:.3g} | " + " / ".join(f"{v:.3g}" for v in finals) + " |", flush=True)
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
