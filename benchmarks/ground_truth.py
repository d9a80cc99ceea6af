"""The measured values behind the ground-truth tests, over several seeds.

Bayesian linear regression (closed-form optimal mean field): KL(q || q*) after the test budgets,
for both mean updates, full batch and mini-batches of 64, K = 4 samples by closure and
``inner_steps=3``. Prints a markdown table (min / median / max over seeds).

    python benchmarks/ground_truth.py --seeds 4
"""

from __future__ import annotations

import argparse
import statistics

import torch

from torch_proxvi import ProxScoreOptimizer
from torch_proxvi.reference.testing import fit_linear_regression, linear_regression

# name: (optimizer options, batch size, steps, lr, decay, closure, the test's bound)
CASES = {
    "full batch, mean_update=score": (dict(mean_update="score"), 200, 12000, 1e-2, 500, False, 0.05),
    "full batch, mean_update=residual": (dict(mean_update="residual"), 200, 12000, 1e-2, 500, False, 0.05),
    "batch 64, mean_update=score": (dict(mean_update="score"), 64, 8000, 1e-2, 500, False, 0.5),
    "batch 64, mean_update=residual": (dict(mean_update="residual"), 64, 8000, 1e-2, 500, False, 0.5),
    "closure, K=4, residual": (dict(mean_update="residual", mc_samples=4), 200, 4000, 3e-2, 300, True, 0.05),
    "inner_steps=3, residual": (dict(mean_update="residual", inner_steps=3), 200, 4000, 3e-2, 300, False, 0.05),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    problem = linear_regression()
    print("| case | steps | KL min / median / max | test bound |")
    print("|---|---|---|---|")
    for name, (options, batch, steps, lr, decay, closure, bound) in CASES.items():
        def make(params, n, options=options, lr=lr):
            return ProxScoreOptimizer(params, lr=lr, dataset_size=n, init_std=0.1, **options)

        kls = [fit_linear_regression(make, problem, batch_size=batch, steps=steps, decay=decay,
                                     seed=seed, use_closure=closure)[2] for seed in range(args.seeds)]
        print(f"| {name} | {steps} | {min(kls):.4f} / {statistics.median(kls):.4f} / {max(kls):.4f} "
              f"| ≤ {bound} |", flush=True)


if __name__ == "__main__":
    main()
