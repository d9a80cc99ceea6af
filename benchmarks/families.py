"""Variational families against each other on non-Gaussian posteriors with an exact answer.

    python benchmarks/families.py              # tables for docs/benchmarks.md, docs/img/families*.png
    python benchmarks/families.py --quick      # one seed, the toy targets only
    python benchmarks/families.py --last-layer-only
    python benchmarks/families.py --last-layer-only --last-layer-steps 12000 --last-layer-runs flow:0.003

Families: the mean-field ``gaussian``, the ``elementwise_flow`` (sinh-arcsinh per weight) and the
dense ``flow`` (affine + spline couplings over the group), all through ProxScoreOptimizer's
ordinary loop (K = 1 sample per step, no closure), the lr decaying linearly to zero.

* Toy targets (torch_proxvi.reference.toy_targets): skew-normal and Student-t (1-D), banana and a bimodal
  mixture (2-D), 3000 steps from N(start, 1).
* The last layer of a small BNN: a 2-4-1 tanh classifier on 30 points of two moons, its
  5-weight head's posterior (prior N(0, 5^2)) against 2000 HMC draws, 3000 steps from
  init_std 0.5.

Metrics: KL(q || p) with the exact normaliser (importance sampling for the BNN), the Fisher
divergence E_q |grad log q - grad log p|^2, and for the BNN the MMD^2 to the HMC draws and the
predictive KL(HMC || q) on a grid. On the toy targets each family's lr is the best of a small grid
by median KL over the seeds; on the BNN every lr is shown (the metrics disagree on which is best).
The flow's network learns at 0.1 lr. Medians over 3 seeds, [min, max] beside them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path

import requires
import torch

from torch_proxvi import ProxScoreOptimizer
from torch_proxvi.reference import toy_targets as T

FAMILIES = ("gaussian", "elementwise_flow", "flow")
LRS = {"gaussian": (0.01, 0.03, 0.1), "elementwise_flow": (0.01, 0.03, 0.1), "flow": (0.003, 0.01)}
STEPS = 3000
PLOTTED_LAST_LAYER = (("gaussian", 0.03), ("elementwise_flow", 0.03), ("flow", 0.003))
_PROBLEM: dict = {}


def _optimizer(family: str, lr: float, **kw):
    return lambda ps: ProxScoreOptimizer(ps, lr, family=family, **kw)


def _toy(task):
    target, family, lr, seed = task
    torch.set_num_threads(1)
    tgt = T.TARGETS[target]
    opt, theta = T.fit(tgt, _optimizer(family, lr, dataset_size=1, prior_precision=1e-6, init_std=1.0),
                       steps=STEPS, seed=seed)
    draws = opt._family(opt.param_groups[0]).sample(opt.param_groups[0], [theta], [opt.state[theta]],
                                                     torch.Generator().manual_seed(7), 3000)[0]
    return task, T.divergences(opt, theta, tgt), draws


def _last_layer(task):
    _, family, lr, seed = task
    torch.set_num_threads(1)
    problem = _PROBLEM["last_layer"]
    opt, head = T.fit_last_layer(problem, _optimizer(family, lr, dataset_size=len(problem.labels),
                                                     prior_precision=1 / problem.prior_std**2,
                                                     init_std=0.5), steps=_PROBLEM["steps"], seed=seed)
    draws = T.head_draws(opt, head, 1500, torch.Generator().manual_seed(7))[0]
    return task, T.last_layer_divergences(opt, head, problem), draws


def _plot_last_layer(problem, draws: dict, path: Path) -> None:
    """Draws on the two leading principal axes of the HMC draws (HMC in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = problem.hmc_draws.mean(0)
    _, _, axes_t = torch.linalg.svd(problem.hmc_draws - centre, full_matrices=False)
    project = lambda d: ((d - centre) @ axes_t[:2].T).numpy()  # noqa: E731
    reference = project(problem.hmc_draws[:1500])
    fig, axes = plt.subplots(1, len(draws), figsize=(4.5 * len(draws), 4.2), sharex=True, sharey=True)
    for ax, ((family, lr), d), colour in zip(axes, draws.items(), ("C0", "C1", "C2")):
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.6", alpha=0.5, label="HMC")
        points = project(d)
        ax.scatter(points[:, 0], points[:, 1], s=2, c=colour, alpha=0.5, label=f"{family} (lr {lr})")
        ax.set_xlabel("1st principal axis of HMC")
        ax.legend(fontsize=8, markerscale=4)
    axes[0].set_ylabel("2nd principal axis")
    fig.suptitle("BNN last layer: the head's posterior, seed 0")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _summary(results, name, family, metric):
    """(best lr, median, min, max) of ``metric`` for the lr with the lowest median KL."""
    best = None
    for lr in LRS[family]:
        kls = [r["kl"] for key, r in results.items() if key[:3] == (name, family, lr)]
        if kls and (best is None or statistics.median(kls) < best[1]):
            best = (lr, statistics.median(kls))
    values = [r[metric] for key, r in results.items() if key[:3] == (name, family, best[0])]
    return best[0], statistics.median(values), min(values), max(values)


def _table(results, names, metrics) -> str:
    lines = ["| problem | family | lr | " + " | ".join(metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    present = [f for f in FAMILIES if any(key[1] == f for key in results)]
    for name in names:
        for family in present:
            cells = []
            for metric in metrics:
                lr, med, lo, hi = _summary(results, name, family, metric)
                cells.append(f"{med:.4g} [{lo:.3g}, {hi:.3g}]")
            lines.append(f"| {name} | {family} | {lr} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table_all(results, metrics) -> str:
    """One row per (family, lr): median [min, max] over the seeds."""
    lines = ["| family | lr | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    runs = sorted({key[1:3] for key in results}, key=lambda run: (FAMILIES.index(run[0]), run[1]))
    for family, lr in runs:
        rows = [r for key, r in results.items() if key[1:3] == (family, lr)]
        cells = [f"{statistics.median(r[m] for r in rows):.4g} [{min(r[m] for r in rows):.3g}, "
                 f"{max(r[m] for r in rows):.3g}]" for m in metrics]
        lines.append(f"| {family} | {lr} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(draws, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, (name, tgt) in zip(axes, T.TARGETS.items()):
        if tgt.dim == 1:
            grid = torch.linspace(-4, 5, 400, dtype=torch.float64)[:, None]
            ax.plot(grid[:, 0], tgt.log_prob(grid).exp(), "k", lw=2, label="target")
            for family in FAMILIES:
                ax.hist(draws[(name, family)][:, 0].numpy(), bins=80, range=(-4, 5), density=True,
                        histtype="step", lw=1.5, label=family)
        else:
            axis = torch.linspace(-4.5, 4.5, 200, dtype=torch.float64)
            grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1)
            ax.contour(axis, axis, tgt.log_prob(grid).exp(), levels=6, colors="k", linewidths=1)
            for family, colour in zip(FAMILIES, ("C0", "C1", "C2")):
                d = draws[(name, family)][:600]
                ax.scatter(d[:, 0], d[:, 1], s=2, alpha=0.5, c=colour, label=family)
        ax.set_title(name)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one seed, toy targets only")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--plot", default="docs/img/families.png", help="figure path ('': no figure)")
    ap.add_argument("--last-layer-only", action="store_true", help="skip the toy targets")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES,
                    help="the toy targets' families (the plot needs all of them)")
    ap.add_argument("--last-layer-steps", type=int, default=STEPS, help="the BNN runs' step budget")
    ap.add_argument("--last-layer-runs", nargs="*", default=None, metavar="FAMILY:LR",
                    help="only these BNN runs, e.g. flow:0.003 (default: every family at every lr)")
    args = ap.parse_args()
    requires.require(["zuko"] if "flow" in args.families or not args.quick else [])
    if args.plot:
        requires.require(["matplotlib"], why="for its figures (--plot '' skips them)")
    seeds = range(1 if args.quick else args.seeds)
    start = time.time()
    if not args.last_layer_only:
        _toys(args, seeds, start)
    if not args.quick:
        _bnn(args, seeds, start)


def _toys(args, seeds, start) -> None:
    tasks = [(name, f, lr, s) for name in T.TARGETS for f in args.families for lr in LRS[f] for s in seeds]
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        toy = {}
        draws = {}
        for task, result, sample in pool.imap_unordered(_toy, tasks):
            toy[task] = result
            draws.setdefault(task[:2] + (task[2],), {})[task[3]] = sample
    print(f"## Toy targets ({time.time() - start:.0f} s)\n")
    print(_table(toy, list(T.TARGETS), ["kl", "fisher"]))
    if set(args.families) != set(FAMILIES) or not args.plot:
        return
    best = {(name, f): draws[(name, f, _summary(toy, name, f, "kl")[0])][0]
            for name in T.TARGETS for f in FAMILIES}
    _plot(best, Path(args.plot))


def _bnn(args, seeds, start) -> None:
    _PROBLEM["last_layer"], _PROBLEM["steps"] = T.last_layer(), args.last_layer_steps
    runs = [(f, lr) for f in FAMILIES for lr in LRS[f]]
    if args.last_layer_runs is not None:
        runs = [(f, float(lr)) for f, lr in (r.split(":") for r in args.last_layer_runs)]
    tasks = [("last layer", f, lr, s) for f, lr in runs for s in seeds]
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        bnn, draws = {}, {}
        for task, result, sample in pool.imap_unordered(_last_layer, tasks):
            bnn[task] = result
            draws[task] = sample
    print(f"\n## BNN last layer against HMC ({time.time() - start:.0f} s in all, "
          f"{args.last_layer_steps} steps)\n")
    print(_table_all(bnn, ["kl", "fisher", "mmd", "predictive_kl"]))
    if args.last_layer_runs is None and args.plot:
        shown = {(f, lr): draws[("last layer", f, lr, 0)] for f, lr in PLOTTED_LAST_LAYER}
        _plot_last_layer(_PROBLEM["last_layer"], shown, Path(args.plot).with_name("families_last_layer.png"))


if __name__ == "__main__":
    main()
