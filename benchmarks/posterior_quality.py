"""Posterior quality against the number of score evaluations: ProxScore, ADVI, GSM, BaM.

    python benchmarks/posterior_quality.py                 # the full table and docs/img PNG
    python benchmarks/posterior_quality.py --quick         # one problem, one seed (smoke run)

Three posteriors with a known answer (benchmarks/problems.py): Bayesian linear regression
(closed form), Bayesian logistic regression on breast cancer and a 1-3-1 BNN on a noisy sine
(long-run HMC references). Each method runs through its torch.optim interface with a closure
that evaluates the mean NLL of a batch (all N points, or 32 drawn per step) at each of its K
samples; one score evaluation = one closure call. Every method's lr is chosen from a small grid
by the final KL at seed 0, separately for each problem and batch regime, then run on all seeds.

Metric on the two regressions: KL(q || reference), for the mean-field methods to the
mean-field projection of the posterior (their common fixed point), for the dense GSM/BaM to the
full Gaussian (their target). On the BNN, whose posterior is far from Gaussian: the KL between
q's and HMC's predictive at 41 inputs (Gaussian moments, noise included), averaged over inputs.
Reported: score evaluations until the metric stays at or below 0.1 (median over seeds; "-" if
never) and the final value (median and max over seeds).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import problems as P  # noqa: E402
import requires  # noqa: E402

from torch_proxvi import ADVI, GSM, BaM, ProxScoreOptimizer  # noqa: E402

# name -> (factory(params, lr, n), samples per step K, lr grid, decaying lr?, dense?)
METHODS = {
    "ProxScore": (lambda ps, lr, n: ProxScoreOptimizer(ps, lr, dataset_size=n, init_std=0.1),
                  1, (0.01, 0.03, 0.1), True, False),
    "ProxScore (residual)": (lambda ps, lr, n: ProxScoreOptimizer(
        ps, lr, dataset_size=n, init_std=0.1, mean_update="residual"), 1, (0.01, 0.03, 0.1), True, False),
    "ProxScore (solved)": (lambda ps, lr, n: ProxScoreOptimizer(ps, lr, dataset_size=n, rule="solved"),
                           1, (0.01, 0.03, 0.1), True, False),
    "ProxScore (solved, newton)": (lambda ps, lr, n: ProxScoreOptimizer(
        ps, lr, dataset_size=n, rule="solved", mean_update="newton"), 1, (0.03, 0.1, 0.3), True, False),
    "ADVI": (lambda ps, lr, n: ADVI(ps, lr, dataset_size=n, init_std=0.1),
             1, (0.01, 0.03, 0.1), True, False),
    "GSM (diagonal)": (lambda ps, lr, n: GSM(ps, lr, dataset_size=n, init_std=0.1, mc_samples=8),
                       8, (0.1, 0.3, 1.0), False, False),
    "BaM (diagonal)": (lambda ps, lr, n: BaM(ps, lr, dataset_size=n, init_std=0.1, mc_samples=8),
                       8, (1.0, 10.0, 100.0), False, False),
    "GSM (dense)": (lambda ps, lr, n: GSM(ps, lr, dataset_size=n, init_std=0.1, mc_samples=8,
                                          covariance="dense"), 8, (0.1, 0.3, 1.0), False, True),
    "BaM (dense)": (lambda ps, lr, n: BaM(ps, lr, dataset_size=n, init_std=0.1, mc_samples=8,
                                          covariance="dense"), 8, (1.0, 10.0, 100.0), False, True),
}
MAIN = list(METHODS)
# The ablation of ProxScore's knobs (--ablation), at the same budget of score evaluations.
ABLATION = {
    "ProxScore inner_steps=3": dict(inner_steps=3),
    "ProxScore inner_steps=3, prox_weight=10": dict(inner_steps=3, prox_weight=10.0),
    "ProxScore (residual) inner_steps=3": dict(inner_steps=3, mean_update="residual"),
    "ProxScore mc_samples=4": dict(mc_samples=4),
    "ProxScore betas=(0, 0.999)": dict(betas=(0.0, 0.999)),   # the compact state: no first moments
}
for _name, _kw in ABLATION.items():
    METHODS[_name] = (lambda ps, lr, n, kw=_kw: ProxScoreOptimizer(ps, lr, dataset_size=n, init_std=0.1, **kw),
                      _kw.get("mc_samples", 1), (0.01, 0.03, 0.1), True, False)


def predictive_kl(opt, theta, problem: P.Problem, dense: bool, draws: int = 512) -> float:
    """Mean over the grid of KL(N(mean_q, var_q) || N(mean_ref, var_ref)) of the predictive."""
    mean = opt.posterior_mean(theta).double()
    eps = torch.randn(draws, problem.dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    if dense and theta in opt.state:
        cov = opt.state[theta]["covariance"].double()
        values, vectors = torch.linalg.eigh(0.5 * (cov + cov.T))
        factor = vectors * values.clamp_min(0).sqrt()
        samples = mean + eps @ factor.T
    else:
        samples = mean + opt.posterior_std(theta).double() * eps
    f = problem.predict(samples)
    if not torch.isfinite(f).all():
        return math.inf
    m, v = f.mean(0), f.var(0) + 0.1**2
    kl = 0.5 * (v / problem.pred_var + (m - problem.pred_mean) ** 2 / problem.pred_var - 1
                + torch.log(problem.pred_var / v))
    return float(kl.mean())


def kl_to_reference(opt, theta, problem: P.Problem, dense: bool) -> float:
    if problem.predict is not None:
        return predictive_kl(opt, theta, problem, dense)
    mean = opt.posterior_mean(theta).double()
    if not dense:
        var, ref_var = opt.posterior_std(theta).double() ** 2, problem.mf_var
        return float(0.5 * (var / ref_var + (mean - problem.mf_mean) ** 2 / ref_var - 1
                            + torch.log(ref_var / var)).sum())
    cov = opt.state[theta]["covariance"].double() if theta in opt.state else \
        torch.eye(problem.dim, dtype=torch.float64) * float(opt.posterior_std(theta)[0]) ** 2
    prec = torch.linalg.inv(problem.cov)
    diff = mean - problem.mean
    kl = 0.5 * (torch.trace(prec @ cov) + diff @ prec @ diff - problem.dim
                + torch.logdet(problem.cov) - torch.logdet(cov))
    return float(kl) if torch.isfinite(kl) else math.inf


def run(problem: P.Problem, method: str, lr: float, *, batch: int | None, evals: int, seed: int,
        points: int = 60) -> tuple[list[int], list[float]]:
    """KL after every ``evals / points`` score evaluations of one run."""
    factory, k, _, decay, dense = METHODS[method]
    torch.manual_seed(seed)
    theta = torch.nn.Parameter(problem.init.clone())
    opt = factory([theta], lr, problem.n)
    steps = evals // k
    if decay:  # Adam-type methods: lr / (1 + t / (steps / 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + 10 * t / steps))
    gen = torch.Generator().manual_seed(seed)
    every = max(1, steps // points)
    xs, ys = [0], [kl_to_reference(opt, theta, problem, dense)]
    for t in range(1, steps + 1):
        idx = torch.arange(problem.n) if batch is None else torch.randint(problem.n, (batch,), generator=gen)

        def closure(idx=idx):
            opt.zero_grad()
            loss = problem.nll(theta[None], idx)[0]
            loss.backward()
            return loss

        opt.step(closure)
        if decay:
            sched.step()
        if t % every == 0 or t == steps:
            xs.append(t * k)
            ys.append(kl_to_reference(opt, theta, problem, dense))
    return xs, ys


def final(ys: list[float]) -> float:
    tail = ys[-5:]
    return math.inf if not all(map(math.isfinite, tail)) else sum(tail) / len(tail)


def evals_to(xs, ys, level=0.1) -> float:
    """The first evaluation count after which the KL stays at or below ``level``."""
    for i in range(len(ys)):
        if all(y <= level for y in ys[i:]):
            return xs[i]
    return math.inf


REGIMES = {"full batch": None, "batch 32": 32}
PROBLEMS: list = []
ARGS: tuple = ()


def _task(task):
    """Tune the lr on seed 0 by the final metric, then run the other seeds (a worker process)."""
    i, regime, m = task
    torch.set_num_threads(1)   # matrices of at most 31 x 31: threads only add overhead
    warnings.simplefilter("ignore", RuntimeWarning)   # skipped steps show up in the metric
    evals, seeds = ARGS
    pr, batch, grid = PROBLEMS[i], REGIMES[regime], METHODS[m][2]
    tuned = {lr: run(pr, m, lr, batch=batch, evals=evals, seed=0) for lr in grid}
    lr = min(grid, key=lambda v: final(tuned[v][1]))
    runs = [tuned[lr]] + [run(pr, m, lr, batch=batch, evals=evals, seed=s) for s in range(1, seeds)]
    print(f"{pr.name:30s} {regime:10s} {m:40s} lr {lr:<6g} final {final(runs[0][1]):.3g}", flush=True)
    return lr, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--evals", type=int, default=6000, help="score evaluations per run")
    ap.add_argument("--methods", nargs="*", default=MAIN, choices=list(METHODS), metavar="METHOD")
    ap.add_argument("--ablation", action="store_true",
                    help="ProxScore's variants and ADVI instead of the main comparison")
    ap.add_argument("--quick", action="store_true", help="linear regression only, one seed")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--plot", default=None, help="PNG path (default docs/img/posterior_quality[_ablation].png; "
                    "'': no figure)")
    args = ap.parse_args()
    requires.require([] if args.quick else ["sklearn"])  # the logistic regression's breast cancer data
    if args.plot != "":
        requires.require(["matplotlib"], why="for its figure (--plot '' skips it)")
    if args.ablation:
        args.methods = ["ProxScore", "ADVI", *ABLATION]
    if args.plot is None:
        args.plot = f"docs/img/posterior_quality{'_ablation' if args.ablation else ''}.png"
    torch.set_num_threads(1)
    t0 = time.time()
    problems = [P.blr()] if args.quick else [P.blr(), P.logistic(), P.bnn()]
    seeds = 1 if args.quick else args.seeds
    for pr in problems:
        print(f"# {pr.name}: reference {pr.note} ({time.time() - t0:.0f} s)", flush=True)
    global PROBLEMS, ARGS
    PROBLEMS, ARGS = problems, (args.evals, seeds)
    tasks = [(i, regime, m) for i in range(len(problems)) for regime in REGIMES for m in args.methods]
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        results = pool.map(_task, tasks, chunksize=1)
    curves, rows = {}, []
    for (i, regime, m), (lr, runs) in zip(tasks, results):
        name = problems[i].name
        curves[name, regime, m] = runs
        finals = sorted(final(ys) for _, ys in runs)
        reach = sorted(evals_to(xs, ys) for xs, ys in runs)
        rows.append((name, regime, m, lr, reach[len(reach) // 2], finals[len(finals) // 2], finals[-1]))
    print("\n| problem | batch | method | lr | evaluations to metric ≤ 0.1 | final metric (median) "
          "| final metric (max) |")
    print("|---|---|---|---|---|---|---|")
    for name, regime, m, lr, reach, med, worst in rows:
        reach_s = "–" if math.isinf(reach) else f"{reach:.0f}"
        print(f"| {name} | {regime} | {m} | {lr:g} | {reach_s} | {med:.3g} | {worst:.3g} |")
    print(f"\n{args.evals} score evaluations per run, {seeds} seeds, total {time.time() - t0:.0f} s")
    if args.plot:
        plot(curves, problems, args.methods, args.plot)


def plot(curves, problems, methods, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(problems), 2, figsize=(11, 3.3 * len(problems)), squeeze=False)
    for i, pr in enumerate(problems):
        for j, regime in enumerate(REGIMES):
            ax = axes[i][j]
            for m in methods:
                runs = curves[pr.name, regime, m]
                xs = runs[0][0]
                ys = torch.tensor([r[1] for r in runs]).nan_to_num(nan=1e6, posinf=1e6).median(0).values
                ax.plot(xs, ys.clamp(1e-4, 1e6), label=m, ls="--" if "dense" in m else "-")
            ax.axhline(0.1, color="grey", lw=0.5)
            ax.set_yscale("log")
            ax.set_title(f"{pr.name}, {regime}", fontsize=9)
            ax.set_xlabel("score evaluations")
            ax.set_ylabel("predictive KL to HMC" if pr.predict is not None else "KL to reference")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
