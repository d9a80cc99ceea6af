"""Monte Carlo predictive: average the model's predictions over posterior samples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._validation import check_count

__all__ = ["predictive", "model_output"]

_LIKELIHOODS = ("classification", "regression")


def model_output(model: torch.nn.Module, inputs: Any) -> Tensor:
    """``model(**inputs)`` for a mapping, else ``model(inputs)``; ``.logits`` when present."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if not isinstance(out, Tensor):
        raise TypeError(f"model output must be a tensor or have .logits, got {type(out).__name__}")
    return out


@torch.no_grad()
def predictive(optimizer, model: torch.nn.Module, inputs: Any, *, n_samples: int = 32,
               likelihood: str = "classification",
               generator: torch.Generator | None = None):
    r"""Bayesian model average over ``n_samples`` draws :math:`\theta_j \sim q`.

    ``likelihood="classification"``: :math:`\frac1S \sum_j \mathrm{softmax}(f(x; \theta_j))`,
    shape ``[B, C]`` (float32). ``likelihood="regression"``: ``(mean, variance)`` of the model
    output over the samples (the epistemic part; add the noise variance yourself).

    Runs under ``torch.no_grad()`` and leaves the weights as it found them. Draws from
    ``generator``, by default from the optimizer's evaluation generator (its own stream, seeded
    from the optimizer's seed): never from the training RNG nor torch's global RNG, so evaluating
    changes neither training nor the shuffling and dropout that follow. Successive calls draw new
    samples; pass a seeded ``generator`` to repeat a result. The model's train/eval mode is left
    to the caller (call ``model.eval()`` to disable dropout).
    """
    check_count("n_samples", n_samples, 1)
    if likelihood not in _LIKELIHOODS:
        raise ValueError(f"Invalid likelihood: {likelihood!r} (choose one of {_LIKELIHOODS})")
    # Sums of (out - first) and its square: the shift keeps the variance free of cancellation.
    first = total = total_sq = None
    with optimizer.sampled_params(generator) as redraw:
        for j in range(n_samples):
            if j:
                redraw()
            out = model_output(model, inputs).float()
            if likelihood == "classification":
                out = torch.softmax(out, dim=-1)
            if first is None:
                first, total, total_sq = out, torch.zeros_like(out), torch.zeros_like(out)
            shifted = out - first
            total.add_(shifted)
            total_sq.addcmul_(shifted, shifted)
    mean_shift = total / n_samples
    mean = first + mean_shift
    if likelihood == "classification":
        return mean
    var = (total_sq / n_samples - mean_shift * mean_shift).clamp_min_(0.0)
    return mean, var
