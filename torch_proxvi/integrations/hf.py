"""Hugging Face ``transformers`` integration: the ``Trainer`` and the Bayesian predictive.

What the ``Trainer`` already does (checked on transformers 5.24): because schedule-free
optimizers need it, it calls ``optimizer.eval()`` at the start of every evaluation loop
(``evaluate()`` and ``predict()``) and ``optimizer.train()`` at the start of every
``training_step``. So evaluation sees the posterior mean, and training always resumes on the
training sample. What it does not do is call ``optimizer.train()`` when an evaluation ends: after
``trainer.evaluate()`` / ``trainer.predict()`` the weights stay the posterior mean. A checkpoint
written right after an evaluation (``save_strategy`` equal to ``eval_strategy``) then holds the mean
in the model's weights and the training sample in the optimizer's state_dict (saved in eval mode),
so resuming from it continues exactly all the same (the next ``training_step`` calls
``optimizer.train()``, which writes the loaded training sample back).
:class:`PosteriorMeanCallback` adds the missing ``optimizer.train()``, so that after an evaluation
the weights are the training sample again (for code of yours that reads them). It also warns when
a (older) ``Trainer`` did not call ``optimizer.eval()``.

Example::

    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup
    from torch_proxvi import ProxScoreOptimizer, metrics
    from torch_proxvi.integrations.hf import PosteriorMeanCallback, bayesian_predict

    opt = ProxScoreOptimizer(model.parameters(), lr=1e-3, dataset_size=len(train_ds), prior_mean="init")
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=1000)
    args = TrainingArguments("out", max_steps=1000, max_grad_norm=0.0, report_to=[])
    trainer = Trainer(model, args, train_dataset=train_ds, eval_dataset=val_ds,
                      optimizers=(opt, sched), callbacks=[PosteriorMeanCallback()])
    trainer.train()
    trainer.evaluate()                        # on the posterior mean; the training sample is back after
    probs, labels = bayesian_predict(opt, model, test_ds, n_samples=32)
    print(metrics.accuracy(probs, labels), metrics.nll(probs, labels), metrics.ece(probs, labels))
    with opt.mean_params():                   # export the mean, not the last training sample
        trainer.save_model("out/posterior-mean")

``max_grad_norm=0.0`` turns off the Trainer's gradient clipping (default 1.0): clipping shrinks the
likelihood score against the prior and so biases the posterior. :class:`PosteriorMeanCallback`
warns when training begins with clipping on (it leaves the user's arguments as they are).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import TrainerCallback

__all__ = ["PosteriorMeanCallback", "bayesian_predict", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch_proxvi optimizer inside wrappers (accelerate's ``AcceleratedOptimizer``, ...).

    ``trainer.optimizer`` is such a wrapper once training has started; it forwards ``train()`` and
    ``eval()`` but not ``predictive()``.
    """
    for _ in range(8):
        if optimizer is None or hasattr(optimizer, "sampled_params") or not hasattr(optimizer, "optimizer"):
            break
        optimizer = optimizer.optimizer
    return optimizer


class PosteriorMeanCallback(TrainerCallback):
    """Put the training sample back into the weights when a ``Trainer`` evaluation ends.

    The ``Trainer`` itself calls ``optimizer.eval()`` (posterior mean into the weights) when
    ``evaluate()``/``predict()`` begin and ``optimizer.train()`` only when the next training step
    begins; this callback calls ``optimizer.train()`` in ``on_evaluate`` and ``on_predict``, so that
    after an evaluation the weights are exactly what they were before it.

    When training begins with the Trainer's gradient clipping on (``max_grad_norm > 0``; its
    default is 1.0) it warns: clipping shrinks the likelihood score against the prior, so the
    posterior is biased; pass ``TrainingArguments(max_grad_norm=0.0)``.

    Args:
        optimizer: the torch_proxvi optimizer; default: the ``optimizer`` the Trainer passes to
            callbacks (the one given in ``Trainer(optimizers=(opt, scheduler))``).
        warn: warn when an evaluation ran without ``optimizer.eval()`` having been called (a
            ``transformers`` version without schedule-free support: it evaluated a sample).
    """

    def __init__(self, optimizer: Any = None, *, warn: bool = True):
        self.optimizer = optimizer
        self.warn = warn

    def _restore(self, kwargs: dict[str, Any]) -> None:
        opt = unwrap_optimizer(self.optimizer if self.optimizer is not None else kwargs.get("optimizer"))
        if opt is None or not callable(getattr(opt, "train", None)):
            return
        if self.warn and getattr(opt, "_mode", None) == "train":
            warnings.warn("the Trainer evaluated without calling optimizer.eval(): the metrics are those of a "
                          "posterior sample, not of the posterior mean (update transformers, or wrap the "
                          "evaluation in `with optimizer.mean_params():`)", RuntimeWarning, stacklevel=2)
        opt.train()

    def on_train_begin(self, args, state, control, **kwargs):
        norm = getattr(args, "max_grad_norm", None)
        if norm is not None and norm > 0:
            warnings.warn(f"the Trainer clips gradients (max_grad_norm={norm}): clipping shrinks the likelihood "
                          f"score against the prior and biases the posterior; pass "
                          f"TrainingArguments(max_grad_norm=0.0)", UserWarning, stacklevel=2)

    def on_evaluate(self, args, state, control, **kwargs):
        self._restore(kwargs)

    def on_predict(self, args, state, control, **kwargs):
        self._restore(kwargs)


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


@torch.no_grad()
def bayesian_predict(
    optimizer: Any,
    model: torch.nn.Module,
    dataset: Any,
    *,
    n_samples: int = 32,
    batch_size: int = 64,
    collate_fn: Callable[[list], Any] | None = None,
    label_key: str | None = "labels",
    seed: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Bayesian predictive ``(probs [N, C], labels [N] or None)`` over a dataset of dicts.

    Each item is a dict of model inputs (``pixel_values``, ``input_ids``, ...) plus the label
    under ``label_key``, as a Hugging Face dataset (``with_format("torch")``) or a ``Trainer``
    dataset yields it; the batches (``DataLoader``, in order, ``collate_fn`` or torch's default
    collation) go to ``model(**inputs)`` without the label, and each batch's probabilities are
    :meth:`optimizer.predictive <torch_proxvi.ProxScoreOptimizer.predictive>`: the softmax averaged
    over ``n_samples`` posterior samples.

    The model is in eval mode during prediction and its mode is restored afterwards; the weights
    (training sample, or the mean in eval mode) and the optimizer's training RNG are left as they
    were. ``seed`` makes the result reproducible and uses the same ``n_samples`` weight samples for
    every batch (one ensemble of ``n_samples`` networks); without it each batch draws its own from
    the optimizer's evaluation generator (torch's global RNG is left alone). ``labels`` is None
    when the items have no ``label_key``. ``optimizer`` may also be ``trainer.optimizer``
    (accelerate's wrapper).
    """
    opt = unwrap_optimizer(optimizer)
    if not callable(getattr(opt, "predictive", None)):
        raise TypeError(f"optimizer must be a torch_proxvi optimizer, got {type(optimizer).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r} (must be an int >= 1)")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    device = _device(model)
    probs: list[Tensor] = []
    labels: list[Tensor] | None = []
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if not isinstance(batch, Mapping):
                raise TypeError(f"dataset items must be dicts of model inputs, got batches of {type(batch).__name__}")
            inputs = {k: _to(v, device) for k, v in batch.items() if k != label_key}
            if labels is not None and label_key in batch:
                labels.append(torch.as_tensor(batch[label_key]).cpu())
            else:
                labels = None
            generator = None if seed is None else torch.Generator(device).manual_seed(seed)
            probs.append(opt.predictive(model, inputs, n_samples=n_samples, generator=generator).cpu())
    finally:
        model.train(was_training)
    if not probs:
        raise ValueError("the dataset is empty")
    return torch.cat(probs), (torch.cat(labels) if labels else None)
