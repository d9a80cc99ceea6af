"""How the dense flow depends on its start: a correlated 2-D Gaussian from several ``init_std``.

    python benchmarks/flow_start.py                                  # the table in docs/benchmarks.md
    python benchmarks/flow_start.py --scale-lr-ratio 1 --delay 0     # the defaults before 2026-11-27
    python benchmarks/flow_start.py --init-stds 0.1 --steps 3000 12000

Target N(0, [[1, rho], [rho, 1]]) with rho = 0.9 (unit marginal scale); the mean-field Gaussian
can reach at best KL = -log(1 - rho^2)/2 = 0.83 here. Each run fits ``family="flow"`` (or
``--family``) through the ordinary loop of ``torch_proxvi.reference.toy_targets.fit`` (K = 1, lr decaying
linearly to zero; the family's defaults unless ``--scale-lr-ratio`` / ``--delay`` are given) and
reports KL(q || p) and the Fisher divergence over 4000 draws of q. Runs are spread over
``--workers`` processes, one thread each.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import requires
import torch

from torch_proxvi import ProxScoreOptimizer
from torch_proxvi.reference import toy_targets as T

RHO = 0.9


def run(task):
    family, lr, init_std, steps, seed, options = task
    torch.set_num_threads(1)
    start = time.time()
    target = T.correlated_gaussian(RHO)
    opt, theta = T.fit(target, lambda ps: ProxScoreOptimizer(ps, lr, dataset_size=1, prior_precision=1e-6,
                                                             init_std=init_std, family=family, **options),
                       steps=steps, seed=seed)
    return task, T.divergences(opt, theta, target), time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="flow")
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--init-stds", type=float, nargs="*", default=[1.0, 0.1, 0.01, 0.001])
    ap.add_argument("--scale-lr-ratio", type=float, default=None, help="default: the family's")
    ap.add_argument("--delay", type=int, default=None, help="flow_options['delay'] (default: the family's)")
    ap.add_argument("--steps", type=int, nargs="*", default=[3000, 12000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    requires.require(["zuko"] if args.family == "flow" else [])
    options = {} if args.scale_lr_ratio is None else {"scale_lr_ratio": args.scale_lr_ratio}
    if args.delay is not None:
        options["flow_options"] = {"delay": args.delay}
    tasks = [(args.family, args.lr, s, n, args.seed, options) for s in args.init_stds for n in args.steps]
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        results = sorted(pool.imap_unordered(run, tasks), key=lambda r: (-r[0][2], r[0][3]))
    print(f"{args.family}, lr {args.lr}, rho {RHO}, seed {args.seed}, options {options or 'defaults'}\n")
    print("| init_std | steps | KL | Fisher | seconds |\n|---|---|---|---|---|")
    for (_, _, init_std, steps, _, _), metrics, seconds in results:
        print(f"| {init_std:g} | {steps} | {metrics['kl']:.4f} | {metrics['fisher']:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
